"""The model: a stock HF dense anchor and its stock MoE sibling (flexmoe.arch's table: OLMo-2 →
FlexOlmo, Llama/Mistral → Mixtral, Qwen3 → Qwen3-MoE) plus what FlexOlmo-the-method adds.

flexmoe does not re-implement the transformer. It adds, as a small diff over the MoE class:
- a per-layer, per-expert router bias b ≤ 0 (the paper's negative bias; stock HF has none),
- expert masks (global or per batch row) that set excluded experts' logits to −∞ before the
  softmax, with top-k clipped to the active experts — the exact opt-out,
- optional recording of routing weights, for attribution.

Per-request routing (expert mask, per-row masks, recording) is owned by one context manager,
`with routing(model, mask=…, rows=…, record=…)`. Its state is thread-local, so two requests
using one model from two threads never see each other's masks, and it is restored on any exit.
The router's `active` buffer is only the model's standing default (experts withheld at load).

A row whose mask leaves fewer than top-k experts is padded with its own top expert at weight 0
(not HF's "no expert" sentinel, which only the eager experts implementation skips), so masks are
exact on every experts backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Olmo2Config, Olmo2ForCausalLM, PretrainedConfig, PreTrainedModel

from flexmoe.errors import FlexmoeError

ROPE_THETA = 500_000.0  # OLMo-2's value; HF's Olmo2Config would default to 10_000.
# HF experts implementation per device type, measured by scripts/bench_experts_impl.py (CPU:
# eager fastest for forward and generation); FLEXMOE_EXPERTS_IMPL overrides. Masks are exact on
# all of them (tests/test_merge.py).
EXPERTS_IMPL = "eager"
EXPERTS_IMPL_BY_DEVICE = {"cpu": "eager", "cuda": "grouped_mm"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """auto | cpu | cuda | cuda:N → a device that exists here (auto = CUDA when available)."""
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise FlexmoeError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FlexmoeError(f"--device {spec}: no CUDA device is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FlexmoeError(f"--device {spec}: only {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise FlexmoeError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")
    return dev


def experts_impl_for(device: torch.device) -> str:
    import os

    return os.environ.get("FLEXMOE_EXPERTS_IMPL") or EXPERTS_IMPL_BY_DEVICE.get(
        device.type, EXPERTS_IMPL
    )


def place(model: nn.Module, device: str | torch.device | None = "auto", dtype: str | None = None):
    """Move a model to a device (and dtype), choosing the experts implementation for it."""
    dev = resolve_device(device)
    if dtype is not None and dtype not in DTYPES:
        raise FlexmoeError(f"--dtype {dtype!r}: use {' or '.join(DTYPES)}")
    model.to(device=dev, dtype=DTYPES[dtype] if dtype else None)
    if hasattr(model, "set_experts_implementation") and getattr(model.config, "num_experts", None):
        model.set_experts_implementation(experts_impl_for(dev))
    return model


@dataclass(frozen=True)
class Preset:
    """Model shape plus the training defaults that go with it."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    num_key_value_heads: int | None = None


PRESETS: dict[str, Preset] = {
    # seconds on a CPU: for tests
    "tiny": Preset(64, 2, 4, 192, seq_len=64, batch_size=8, steps=60, lr=1e-2, warmup=5),
    # ≤ 6 minutes on 2 CPU cores with bf16 autocast (scripts/bench_train.py: ~3.2k tokens/s)
    "demo": Preset(256, 4, 4, 768, seq_len=256, batch_size=16, steps=240, lr=3e-3, warmup=20),
    "small": Preset(512, 6, 8, 1536, seq_len=512, batch_size=16, steps=4000, lr=1e-3, warmup=200),
    # OLMo-2 1B / 7B shapes, for GPUs
    "1b": Preset(2048, 16, 16, 8192, seq_len=4096, batch_size=8, steps=10000, lr=4e-4, warmup=2000),
    "7b": Preset(
        4096, 32, 32, 11008, seq_len=4096, batch_size=4, steps=10000, lr=3e-4, warmup=2000
    ),
}


def olmo2_config(preset: str | Preset, vocab_size: int, eos_token_id: int, pad_token_id: int):
    p = PRESETS[preset] if isinstance(preset, str) else preset
    return Olmo2Config(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads or p.num_attention_heads,
        max_position_embeddings=max(p.seq_len, 4096),
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )


def new_anchor(config: Olmo2Config, seed: int) -> Olmo2ForCausalLM:
    torch.manual_seed(seed)
    return Olmo2ForCausalLM(config).float()


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted-name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------- MoE
@dataclass
class _Route:
    mask: torch.Tensor | None  # (experts,) bool
    rows: torch.Tensor | None  # (batch, experts) bool
    records: list | None  # (top_index, top_value) per forward call


_local = threading.local()


def _routes() -> dict[int, _Route]:
    routes = getattr(_local, "routes", None)
    if routes is None:
        routes = _local.routes = {}
    return routes


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a & b


@contextlib.contextmanager
def routing(
    model: nn.Module,
    mask: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    record: bool = False,
) -> Iterator[list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Route this thread's forwards of `model` with an expert mask (E,) and/or per-row masks
    (B, E), AND-ed with any enclosing routing (an inner block can never re-enable an expert).
    record=True yields, per layer, the (top_index, top_value) of every forward call."""
    rs = routers(model)
    routes = _routes()
    saved = {id(r): routes.get(id(r)) for r in rs}
    mask = None if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    rows = None if rows is None else torch.as_tensor(rows, dtype=torch.bool)
    out = []
    try:
        for r in rs:
            outer = saved[id(r)]
            dev = r.weight.device
            rec = [] if record else (outer.records if outer else None)
            routes[id(r)] = _Route(
                _and(outer.mask if outer else None, None if mask is None else mask.to(dev)),
                _and(outer.rows if outer else None, None if rows is None else rows.to(dev)),
                rec,
            )
            out.append(rec)
        yield out
    finally:
        for r in rs:
            if saved[id(r)] is None:
                routes.pop(id(r), None)
            else:
                routes[id(r)] = saved[id(r)]


def current_mask(model: nn.Module) -> torch.Tensor:
    """(E,) bool: the experts this thread's forwards may use now (standing mask ∧ routing)."""
    r = routers(model)[0]
    route = _routes().get(id(r))
    mask = r.active.cpu()
    return mask if route is None or route.mask is None else mask & route.mask.cpu()


class FlexmoeRouter(nn.Module):
    """The MoE block's top-k router plus bias, masks and recording; a drop-in for the stock router
    of every row of flexmoe.arch (same weight, same (logits, weights, indices) outputs). Softmax
    spans the ACTIVE experts only; top-k weights are renormalised when the row's class does."""

    def __init__(self, config: PretrainedConfig, renormalize: bool):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.norm_topk_prob = renormalize
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        self.bias = nn.Parameter(torch.zeros(self.num_experts))
        # the model's standing mask (experts withheld at load); requests use routing()
        self.register_buffer("active", torch.ones(self.num_experts, dtype=torch.bool), False)
        self.use_bias = True
        # training only: unmasked logits computed from a DETACHED input, so a loss on them (gate
        # calibration, z-loss) reaches this router's weight and bias and nothing upstream
        self.captured: list[torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        bias = self.bias.clamp(max=0.0) if self.use_bias else None
        logits = F.linear(hidden_states, self.weight)
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        if self.captured is not None:
            own = F.linear(hidden_states.detach().float(), self.weight.float())
            self.captured.append(own + bias.float() if bias is not None else own)
        route = _routes().get(id(self))
        mask = self.active.unsqueeze(0)
        if route is not None and route.mask is not None:
            mask = mask & route.mask.unsqueeze(0)
        if route is not None and route.rows is not None:
            rows = route.rows.shape[0]
            mask = mask & route.rows.repeat_interleave(hidden_states.shape[0] // rows, dim=0)
        mask = mask.expand_as(logits)
        if not bool(mask.all()):
            if not bool(mask.any(-1).all()):
                raise FlexmoeError("a routing mask leaves a row with no active expert")
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        k = min(self.top_k, int(mask.sum(-1).max()))
        top_value, top_index = torch.topk(probs, k, dim=-1)
        if self.norm_topk_prob:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        chosen_active = mask.gather(1, top_index)
        if not bool(chosen_active.all()):  # a row with fewer active experts than k: pad it with
            # its own top (active) expert at weight 0, exact on every experts implementation
            top_index = torch.where(chosen_active, top_index, top_index[:, :1])
            top_value = top_value.masked_fill(~chosen_active, 0.0)
        top_value = top_value.to(logits.dtype)
        if route is not None and route.records is not None:
            route.records.append((top_index.detach(), top_value.detach().float()))
        return logits, top_value, top_index


class NegativeSoftplus(nn.Module):
    """Bias parametrization b = −softplus(β) on the given experts, 0 on the others.

    b < 0 always and db/dβ = −sigmoid(β) never vanishes, unlike the paper's min(b, 0), whose
    gradient is 0 once b ≥ 0 (so a bias pushed up by the owner's data stays dead at 0).
    """

    def __init__(self, trainable: torch.Tensor):
        super().__init__()
        self.register_buffer("trainable", trainable.to(torch.bool), persistent=False)

    def forward(self, beta: torch.Tensor) -> torch.Tensor:
        return torch.where(self.trainable, -F.softplus(beta), torch.zeros_like(beta))

    def right_inverse(self, b: torch.Tensor) -> torch.Tensor:
        neg = (-b).clamp(min=1e-6)
        return torch.where(self.trainable, torch.log(torch.expm1(neg)), torch.zeros_like(b))


class FrozenSlices(nn.Module):
    """Parametrization: a stacked (experts, …) tensor = its frozen experts (a buffer) with the
    trainable experts' rows put in place. The optimizer then holds gradients and Adam state for
    the trainable rows only, weight decay can never touch a frozen row, and the frozen rows stay
    bit-identical because nothing ever writes to the buffer."""

    def __init__(self, full: torch.Tensor, trainable: list[int]):
        super().__init__()
        self.register_buffer("frozen", full.detach().clone(), persistent=False)
        self.register_buffer("index", torch.tensor(trainable, device=full.device), False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.frozen.index_copy(0, self.index, rows)

    def right_inverse(self, full: torch.Tensor) -> torch.Tensor:
        return full.index_select(0, self.index)


OWNER_TENSORS = ("experts.gate_up_proj", "experts.down_proj", "gate.weight")


def owner_only(model: nn.Module, trainable: list[int]) -> None:
    """Give the trainable experts their own parameters inside every stacked expert tensor and
    router weight (FrozenSlices); undo with merge_owner_params."""
    from torch.nn.utils import parametrize

    for layer in model.model.layers:
        for path in OWNER_TENSORS:
            owner, name = path.split(".")
            mod = getattr(layer.mlp, owner)
            param = getattr(mod, name)
            parametrize.register_parametrization(mod, name, FrozenSlices(param, trainable))


def merge_owner_params(model: nn.Module) -> None:
    """Back to plain stacked tensors (the layout packages and checkpoints are read from)."""
    from torch.nn.utils import parametrize

    for layer in model.model.layers:
        for path in OWNER_TENSORS:
            owner, name = path.split(".")
            mod = getattr(layer.mlp, owner)
            if parametrize.is_parametrized(mod, name):
                parametrize.remove_parametrizations(mod, name, leave_parametrized=True)


def parametrize_bias(model: nn.Module, trainable: list[int], init: float) -> None:
    """Set b = init < 0 on the `trainable` experts of every router, learned through β."""
    from torch.nn.utils import parametrize

    if init >= 0:
        raise FlexmoeError(f"the bias must start negative (got {init})")
    for r in routers(model):
        mask = torch.zeros(r.num_experts, dtype=torch.bool)
        mask[trainable] = True
        with torch.no_grad():
            r.bias.copy_(torch.where(mask, torch.full_like(r.bias, init), r.bias))
        parametrize.register_parametrization(r, "bias", NegativeSoftplus(mask))


class capture_router_logits:
    """`with capture_router_logits(model) as logits:` → after a forward, one (tokens, experts)
    tensor per layer (see FlexmoeRouter.captured)."""

    def __init__(self, model: nn.Module):
        self.rs = routers(model)

    def __enter__(self) -> list[list[torch.Tensor]]:
        for r in self.rs:
            r.captured = []
        return [r.captured for r in self.rs]

    def __exit__(self, *exc) -> bool:
        for r in self.rs:
            r.captured = None
        return False


def install_routers(model: PreTrainedModel) -> PreTrainedModel:
    """Swap the MoE class's stock routers for FlexmoeRouter in place, keeping their weights."""
    from flexmoe.arch import family_of

    # the class's own rule: Mixtral always renormalises (no flag); FlexOlmo and Qwen3-MoE follow
    # their config's norm_topk_prob (a stock checkpoint may set it)
    renorm = bool(
        getattr(model.config, "norm_topk_prob", family_of(model.config.model_type).renormalize)
    )
    for layer in model.model.layers:
        old = layer.mlp.gate
        if isinstance(old, FlexmoeRouter):
            continue
        new = FlexmoeRouter(model.config, renorm).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight)
        layer.mlp.gate = new
    model.set_experts_implementation(EXPERTS_IMPL)
    return model


def routers(model: nn.Module) -> list[FlexmoeRouter]:
    return [m for m in model.modules() if isinstance(m, FlexmoeRouter)]


def upcycle(anchor: PreTrainedModel, num_experts: int, top_k: int) -> PreTrainedModel:
    """The anchor's MoE sibling (flexmoe.arch) whose every expert is a copy of the anchor's FFN;
    every other weight copied by name. Router rows start at zero: callers initialise them
    (domain embedding, random, hidden)."""
    from flexmoe.arch import check_dense, moe_config

    keys = check_dense(anchor.config).keys
    cfg = moe_config(anchor.config, num_experts, top_k)
    with torch.device("meta"):
        model = check_dense(anchor.config).moe_class(cfg)
    model = model.to_empty(device="cpu")
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    src = anchor.state_dict()
    dst = {name: t.clone() for name, t in src.items() if ".mlp." not in name}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp"
        gate_up = torch.cat([src[f"{p}.{keys.gate}"], src[f"{p}.{keys.up}"]], dim=0)
        dst[f"{p}.{keys.experts_gate_up}"] = gate_up.unsqueeze(0).repeat(num_experts, 1, 1)
        down = src[f"{p}.{keys.down}"]
        dst[f"{p}.{keys.experts_down}"] = down.unsqueeze(0).repeat(num_experts, 1, 1)
        dst[f"{p}.{keys.router}"] = torch.zeros(num_experts, cfg.hidden_size)
    missing, unexpected = model.load_state_dict(dst, strict=False)
    tied = cfg.tie_word_embeddings
    missing = [
        m for m in missing if "rotary" not in m and not (tied and m.endswith("lm_head.weight"))
    ]
    if missing or unexpected:
        raise FlexmoeError(f"upcycle: state dict mismatch (missing {missing}, extra {unexpected})")
    if tied:
        model.tie_weights()
    return install_routers(model.float())


def set_active_experts(model: nn.Module, active: list[bool] | torch.Tensor) -> None:
    """The model's standing mask, under every request's routing(): used at load to withhold
    experts whose consent has lapsed. Per-request choices use routing()."""
    active = torch.as_tensor(active, dtype=torch.bool)
    for r in routers(model):
        r.active.copy_(active.to(r.active.device))
