"""Supported architectures: one row per dense family, naming its stock MoE sibling in transformers.

flexmoe never writes a transformer. An anchor is a stock dense checkpoint; an owner's model and a
merged model are the same family's stock MoE class (attention, norms and embeddings copied from
the anchor; each expert an FFN of the anchor's shape) with flexmoe's router installed in every
layer. A row says:
- which dense `model_type`s it accepts and which MoE class they become,
- how the dense config maps to the MoE config (shapes, rope, attention options) and what the dense
  config may not use (the MoE sibling would silently drop it),
- the key map: dense FFN weights → the stacked expert tensors (the same layout for every row
  today: `mlp.{gate,up,down}_proj.weight` → `mlp.experts.{gate_up_proj,down_proj}`, router
  `mlp.gate.weight`),
- `renormalize`: whether the MoE class rescales the top-k routing weights to sum to 1. Mixtral
  always does; FlexOlmo and Qwen3-MoE (as flexmoe configures it) do not. flexmoe's router follows
  the row, so a merged model computes exactly what the stock class computes (minus the bias).
- `router_bias`: whether a merged model keeps the owners' learned router biases. Dropped (b = 0,
  so the stock export is exact) on the Mixtral row: on the SmolLM2 demo the same merged model
  with b = 0 scores mean held-out BPB 0.5% [0.3%, 0.6%] better in the default mode (math 2.0%)
  and 1.1% [0.9%, 1.3%] better with token routing (results/preselect/bias-bpb.md); at the
  results run's 6× budget the bias helped token routing by 0.2% [0.1%, 0.3%] (its default mode
  was not compared), too little to give up an exact stock export. Kept on the OLMo-2 row, where
  they help: `make demo-scratch`'s merged model is 0.7% [0.6%, 0.9%] worse on the mean with b = 0
  (public text 4.5%; results/preselect/bias-bpb-scratch.md). Kept on the Qwen3 row (the paper's
  design; not measured). Packages still train and ship the bias: only the merge drops it
  (`merge(router_bias=True)` keeps it).
- `post_norm`: the block normalises the FFN's output before adding it to the residual stream
  (OLMo-2's `post_feedforward_layernorm`). flexmoe's recipe calibrates the gate after training
  (calibration "auto") only on such rows: re-weighting the gate of a pre-norm block changes what
  the FFN adds to the residual stream, and it measured harmful there (SmolLM2 demo, the classifier
  calibration: mean held-out BPB +4.5% [+3.5, +5.7]; keeping the owner's own routing: +1.5%
  [+1.2, +1.9]; the LM-in-the-loop fit: −0.1% [−0.3, +0.2], results/calibration/demo-smollm2*),
  while on the post-norm scratch anchor it moved public text to the public expert (0.63 → 0.88)
  and public BPB −3.4% [−4.8, −2.1] at a mean of −0.3% [−0.7, +0.0]
  (results/calibration/demo-scratch). Qwen3 is pre-norm like Llama (not measured).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import (
    FlexOlmoConfig,
    FlexOlmoForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2ForCausalLM,
    PretrainedConfig,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from flexmoe.errors import FlexmoeError
from flexmoe.model.device import EXPERTS_IMPL

# config fields every row copies from the dense config when it has them
SHARED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "initializer_range",
    "attention_dropout",
    "tie_word_embeddings",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
)


@dataclass(frozen=True)
class KeyMap:
    """Dense FFN parameter names (under `model.layers.{i}.mlp.`) → the MoE block's names."""

    gate: str = "gate_proj.weight"
    up: str = "up_proj.weight"
    down: str = "down_proj.weight"
    experts_gate_up: str = "experts.gate_up_proj"  # (E, 2I, H): gate rows then up rows
    experts_down: str = "experts.down_proj"  # (E, H, I)
    router: str = "gate.weight"  # (E, H)


@dataclass(frozen=True)
class Family:
    name: str
    dense_types: tuple[str, ...]
    dense_classes: tuple[type, ...]
    moe_type: str
    moe_class: type
    moe_config: Callable[[PretrainedConfig, int, int], PretrainedConfig]
    renormalize: bool
    router_bias: bool = True
    post_norm: bool = False
    unsupported: Callable[[PretrainedConfig], str | None] = lambda c: None
    keys: KeyMap = field(default_factory=KeyMap)

    def dense_class(self, model_type: str) -> type:
        return self.dense_classes[self.dense_types.index(model_type)]


def _shared(dense: PretrainedConfig) -> dict:
    out = {k: getattr(dense, k) for k in SHARED if hasattr(dense, k)}
    rope = getattr(dense, "rope_parameters", None)
    if rope:
        out["rope_parameters"] = dict(rope)
    return out


def _flexolmo(dense: PretrainedConfig, n: int, k: int) -> PretrainedConfig:
    return FlexOlmoConfig(
        **_shared(dense),
        num_experts=n,
        num_experts_per_tok=k,
        norm_topk_prob=False,
        output_router_logits=False,
    )


def _mixtral(dense: PretrainedConfig, n: int, k: int) -> PretrainedConfig:
    return MixtralConfig(
        **_shared(dense),
        sliding_window=getattr(dense, "sliding_window", None),
        num_local_experts=n,
        num_experts_per_tok=k,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )


def _qwen3_moe(dense: PretrainedConfig, n: int, k: int) -> PretrainedConfig:
    return Qwen3MoeConfig(
        **_shared(dense),
        attention_bias=dense.attention_bias,
        use_sliding_window=bool(getattr(dense, "use_sliding_window", False)),
        sliding_window=getattr(dense, "sliding_window", None),
        moe_intermediate_size=dense.intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_experts=n,
        num_experts_per_tok=k,
        norm_topk_prob=False,
        output_router_logits=False,
    )


def _llama_unsupported(c: PretrainedConfig) -> str | None:
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        return "attention or MLP biases (Mixtral has none)"
    if getattr(c, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1"
    return None


def _qwen3_unsupported(c: PretrainedConfig) -> str | None:
    if getattr(c, "use_sliding_window", False):
        return "sliding-window layers (Qwen3-MoE applies one window to every layer)"
    return None


FAMILIES: tuple[Family, ...] = (
    Family(
        "OLMo-2",
        ("olmo2",),
        (Olmo2ForCausalLM,),
        "flex_olmo",
        FlexOlmoForCausalLM,
        _flexolmo,
        renormalize=False,
        post_norm=True,
    ),
    Family(
        "Llama / SmolLM / Mistral",
        ("llama", "mistral"),
        (LlamaForCausalLM, MistralForCausalLM),
        "mixtral",
        MixtralForCausalLM,
        _mixtral,
        renormalize=True,
        router_bias=False,
        unsupported=_llama_unsupported,
    ),
    Family(
        "Qwen3",
        ("qwen3",),
        (Qwen3ForCausalLM,),
        "qwen3_moe",
        Qwen3MoeForCausalLM,
        _qwen3_moe,
        renormalize=False,
        unsupported=_qwen3_unsupported,
    ),
)
DENSE_TYPES = tuple(t for f in FAMILIES for t in f.dense_types)
MOE_TYPES = tuple(f.moe_type for f in FAMILIES)


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.dense_types)})" for f in FAMILIES)


def family_of(model_type: str | None) -> Family:
    """The row for a dense or MoE model_type; a one-line error naming the supported ones."""
    for f in FAMILIES:
        if model_type in f.dense_types or model_type == f.moe_type:
            return f
    raise FlexmoeError(
        f"architecture {str(model_type)[:40]!r} is not supported (supported: {supported()})"
    )


def check_dense(config: PretrainedConfig) -> Family:
    """The row for a dense anchor config, refusing features its MoE sibling would drop."""
    fam = family_of(config.model_type)
    if config.model_type not in fam.dense_types:
        raise FlexmoeError(f"an anchor must be a dense model, got {config.model_type}")
    why = fam.unsupported(config)
    if why:
        raise FlexmoeError(f"{config.model_type} with {why} is not supported")
    return fam


def strip_unknown_config(config: PretrainedConfig) -> list[str]:
    """Remove the keys its config class does not define (`auto_map`, `trust_remote_code`, vendor
    extras), so a written config.json can never point a downstream loader at foreign code.
    Returns the names removed."""
    known = set(type(config)().to_dict())
    dropped = sorted(k for k in config.to_dict() if k not in known)
    for k in dropped:
        if k in vars(config):
            delattr(config, k)
    return dropped


def moe_config(dense: PretrainedConfig, num_experts: int, top_k: int) -> PretrainedConfig:
    """The MoE sibling's config with the anchor's shapes, rope and attention options."""

    cfg = check_dense(dense).moe_config(dense, num_experts, top_k)
    cfg._experts_implementation = EXPERTS_IMPL
    return cfg
