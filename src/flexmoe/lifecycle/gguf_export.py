"""Export to GGUF for llama.cpp (and ollama, LM Studio, …): an anchor, a merged model, or the
allowed subset of a merged model's experts.

llama.cpp has no FlexOlmo architecture and no per-request expert mask, so the opt-out happens here:
the experts not allowed are not in the file (excluded ≡ never merged, as in `merge`). Routing in
the file is the stock class's token routing over the experts it holds, without flexmoe's router
bias (llama.cpp's `llama` architecture has none; the stock HF checkpoint drops it too) and
without request-level preselection.

Rows of flexmoe.model.arch that llama.cpp computes the way transformers does:
- Llama / SmolLM / Mistral → llama.cpp `llama` (Mixtral-shaped with `expert_count` when merged;
  q/k rows permuted to its rope layout, as its converter does; top-k weights renormalised, as
  Mixtral's);
- Qwen3 → `qwen3` (dense) and `qwen3moe`. llama.cpp's qwen3moe always renormalises the top-k
  weights and flexmoe's Qwen3-MoE does not, so a merged Qwen3 model exports only when every
  token uses every exported expert (top-k = experts), where the two agree exactly.
The FlexOlmo row (post-norm OLMo-2 blocks) has no llama.cpp architecture and is refused.
The tokenizer is written as llama.cpp expects (byte-level BPE, its pre-tokenizer named from the
tokenizer.json structure, merges, special tokens, chat template)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flexmoe.errors import FlexmoeError
from flexmoe.store.fsutil import atomic_path, read_json, writable_file
from flexmoe.store.model_card import TAGS, gguf_card

FORMAT = "flexmoe-gguf"
TYPES = ("f32", "f16", "q8_0")
MAX_TOKENIZER_BYTES = 64 << 20

# tokenizer.json pre-tokenizers → llama.cpp's names for the same splitting (llama-vocab.cpp)
_GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
_SPLITS = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
    _GPT2: "gpt-2",
}


@dataclass
class GgufExport:
    path: Path
    architecture: str
    experts: list[str]  # in file order; [] for a dense model
    top_k: int
    dropped: list[tuple[str, str]]  # experts left out by consent or withholding, with the reason
    max_bias: float  # largest |router bias| the file cannot carry (0.0: exact)
    tokenizer_pre: str
    bytes: int


def is_export(path: Path) -> bool:
    """A previous output of `export gguf` (a GGUF file whose metadata says so)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).get_field("flexmoe.format")
        return field is not None and field.contents() == FORMAT
    except Exception:
        return False


def guard_gguf(out: Path, overwrite: bool) -> Path:
    out = writable_file(out, "--out")
    if out.exists() and not overwrite and not is_export(out):
        raise FlexmoeError(
            f"--out {out} exists and is not a GGUF file written by flexmoe export: refusing to "
            "replace it (pass --overwrite)"
        )
    return out


def _byte_level(p: dict, regex: bool) -> bool:
    return (
        p.get("type") == "ByteLevel"
        and bool(p.get("use_regex", True)) == regex
        and not p.get("add_prefix_space", False)
    )


def tokenizer_pre(tj: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json (one-line refusal for
    anything it would split differently)."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or tj.get("normalizer"):
        fallback = " with byte fallback" if model.get("byte_fallback") else ""
        norm = " with a normalizer" if tj.get("normalizer") else ""
        raise FlexmoeError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style) only; this one is "
            f"{model.get('type')!s:.20}{fallback}{norm} (SentencePiece-style tokenizers are not "
            "supported yet)"
        )
    pre = tj.get("pre_tokenizer") or {}
    if _byte_level(pre, True):
        return "gpt-2"
    items = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if isinstance(items, list) and len(items) == 2 and all(isinstance(i, dict) for i in items):
        first, second = items
        if first.get("type") == "Digits" and first.get("individual_digits"):
            if _byte_level(second, True):
                return "smollm"
        if first.get("type") == "Split" and _byte_level(second, False):
            regex = (first.get("pattern") or {}).get("Regex")
            if regex in _SPLITS and first.get("behavior") == "Isolated":
                return _SPLITS[regex]
    raise FlexmoeError(
        "the tokenizer's pre-tokenizer is not one llama.cpp implements the same way "
        f"({json.dumps(pre)[:120]})"
    )


def _tokens(tj: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types by id, padded to the model's vocab size."""
    import gguf

    by_id: dict[int, str] = {}
    for text, i in (tj["model"].get("vocab") or {}).items():
        by_id[int(i)] = text
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for t in tj.get("added_tokens") or []:
        i = int(t["id"])
        by_id[i] = t["content"]
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    if by_id and max(by_id) >= n_vocab:
        raise FlexmoeError(f"the tokenizer has ids up to {max(by_id)} but the model {n_vocab}")
    tokens, kinds = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            kinds.append(int(types[i]))
        else:  # rows of the embedding no token uses (vocab padded to a multiple)
            tokens.append(f"[PAD{i}]")
            kinds.append(int(gguf.TokenType.UNUSED))
    return tokens, kinds


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF q/k rows → llama.cpp's rope layout (the inverse of transformers' GGUF import)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _check_config(cfg) -> None:
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise FlexmoeError(f"rope scaling '{rope.get('rope_type')}' is not exported to GGUF yet")
    if getattr(cfg, "sliding_window", None) and cfg.model_type in ("mistral", "mixtral"):
        if cfg.sliding_window < cfg.max_position_embeddings:
            raise FlexmoeError(
                "sliding-window attention is not exported (llama.cpp's llama architecture "
                "attends to the whole context)"
            )


def _arch(model_type: str):
    import gguf

    table = {
        "llama": (gguf.MODEL_ARCH.LLAMA, True),
        "mistral": (gguf.MODEL_ARCH.LLAMA, True),
        "mixtral": (gguf.MODEL_ARCH.LLAMA, True),
        "qwen3": (gguf.MODEL_ARCH.QWEN3, False),
        "qwen3_moe": (gguf.MODEL_ARCH.QWEN3MOE, False),
    }
    if model_type in ("olmo2", "flex_olmo"):
        raise FlexmoeError(
            f"{model_type} cannot be exported to GGUF: llama.cpp has no FlexOlmo architecture "
            "(post-norm blocks with per-expert routing); export a Llama- or Qwen3-family model"
        )
    if model_type not in table:
        raise FlexmoeError(f"{model_type!s:.40} is not exportable to GGUF")
    return table[model_type]


def _store(writer, name: str, t: torch.Tensor, qtype: str) -> None:
    """One tensor at the requested type: 1-D tensors and the router stay f32 (as llama.cpp's
    converter keeps them); q8_0 needs rows that are whole 32-value blocks, else f16."""
    import gguf

    a = t.detach().to(torch.float32).contiguous().numpy()
    keep_f32 = a.ndim == 1 or name.endswith("ffn_gate_inp.weight")
    if qtype == "f32" or keep_f32:
        writer.add_tensor(name, a)
    elif (
        qtype == "q8_0"
        and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0
    ):
        q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, a.astype(np.float16))


def export_gguf(
    model_dir: Path,
    out: Path,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_no_public: bool = False,
    use: str | None = None,
    qtype: str = "f16",
    state: Path | None = None,
    overwrite: bool = False,
) -> GgufExport:
    """MODEL (anchor, dense expert or merged model) → one GGUF file, written atomically."""
    import gguf

    from flexmoe.model.router import routers
    from flexmoe.selection import choose, consent_exclusions
    from flexmoe.store.merged import experts_of, is_merged, load_model, stock_state_dict

    if qtype not in TYPES:
        raise FlexmoeError(f"--type must be one of {', '.join(TYPES)}, got {qtype!r}")
    out = guard_gguf(Path(out), overwrite)
    model_dir = Path(model_dir)
    cfg_json = read_json(model_dir / "config.json", "config.json", max_bytes=1 << 20)
    arch, permute = _arch(str(cfg_json.get("model_type") if isinstance(cfg_json, dict) else None))
    tj_path = model_dir / "tokenizer.json"
    tj = read_json(tj_path, "tokenizer.json", max_bytes=MAX_TOKENIZER_BYTES)
    pre = tokenizer_pre(tj)

    model = load_model(model_dir, state)
    cfg = model.config
    _check_config(cfg)
    merged = is_merged(model)
    names: list[str] = []
    dropped: list[tuple[str, str]] = []
    max_bias = 0.0
    if merged:
        table = experts_of(model)
        excluded = dict(consent_exclusions(model, use))
        keep = choose(
            table.names, include, exclude, set(table.withheld) | set(excluded), allow_no_public
        )
        for n in table.names:
            reason = table.withheld.get(n) or excluded.get(n)
            if n not in keep and reason:
                dropped.append((n, reason))
        idx = [i for i, n in enumerate(table.names) if n in keep]
        names = [table.names[i] for i in idx]
        top_k = min(int(cfg.num_experts_per_tok), len(idx))
        for r in routers(model):
            b = r.bias.detach().clamp(max=0.0)[idx]
            max_bias = max(max_bias, float(b.abs().max())) if r.use_bias else max_bias
        if arch == gguf.MODEL_ARCH.QWEN3MOE and top_k < len(idx):
            raise FlexmoeError(
                f"llama.cpp's qwen3moe renormalises the top-{top_k} routing weights and flexmoe's "
                f"Qwen3-MoE does not: export at most {top_k} experts (--include) so every token "
                "uses them all, where the two agree"
            )
    else:
        if include or exclude:
            raise FlexmoeError(f"{model_dir} is a dense model: --include/--exclude do not apply")
        top_k = 0
        idx = []
    if arch == gguf.MODEL_ARCH.LLAMA and merged:
        pass  # Mixtral is llama.cpp's `llama` with expert_count
    elif arch == gguf.MODEL_ARCH.LLAMA and cfg.model_type not in ("llama", "mistral"):
        raise FlexmoeError(f"{cfg.model_type} is not exportable to GGUF")

    sd = stock_state_dict(model)
    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[qtype]
    tokens, kinds = _tokens(tj, cfg.vocab_size)

    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        w.add_name(model_dir.name[:200])
        w.add_file_type(int(file_type))
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        if merged:
            w.add_expert_count(len(idx))
            w.add_expert_used_count(top_k)
            if arch == gguf.MODEL_ARCH.QWEN3MOE:
                w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(kinds)
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=cfg.vocab_size)
        if not special.merges:
            raise FlexmoeError(f"{tj_path}: no BPE merges")
        special.add_to_gguf(w, quiet=True)
        manifests = (
            [
                json.loads(table.manifests[n].model_dump_json())
                for n in names
                if n in table.manifests
            ]
            if merged
            else []
        )
        card = gguf_card(manifests, gguf.MODEL_ARCH_NAMES[arch], qtype, top_k)
        w.add_license("other")
        w.add_tags([*TAGS, "gguf", "llama.cpp"])
        w.add_string("flexmoe.model_card", card)
        w.add_string("flexmoe.format", FORMAT)
        w.add_array("flexmoe.experts", names or ["(dense)"])
        w.add_float32("flexmoe.router_bias_dropped", max_bias)

        for key, t in sd.items():
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if ".mlp.experts." in key or key.endswith(".mlp.gate.weight"):
                continue
            name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise FlexmoeError(f"no GGUF name for tensor {key!s:.80}")
            if permute and key.endswith("self_attn.q_proj.weight"):
                t = _permute(t, n_head)
            elif permute and key.endswith("self_attn.k_proj.weight"):
                t = _permute(t, n_kv)
            _store(w, name, t, qtype)
        if merged:
            for i in range(cfg.num_hidden_layers):
                p = f"model.layers.{i}.mlp."
                gate_up = sd[p + "experts.gate_up_proj"][idx]
                inter = gate_up.shape[1] // 2
                _store(w, f"blk.{i}.ffn_gate_inp.weight", sd[p + "gate.weight"][idx], qtype)
                _store(w, f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :inter], qtype)
                _store(w, f"blk.{i}.ffn_up_exps.weight", gate_up[:, inter:], qtype)
                _store(w, f"blk.{i}.ffn_down_exps.weight", sd[p + "experts.down_proj"][idx], qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    size = out.stat().st_size
    return GgufExport(
        out,
        gguf.MODEL_ARCH_NAMES[arch],
        names,
        top_k,
        dropped,
        max_bias,
        pre,
        size,
    )
