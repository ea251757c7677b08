"""Inference on a merged model: load, choose experts per request, generate, attribute.

Choosing experts never reloads or changes weights: it flips the routers' `active` masks (or sets
per-row masks), which put −∞ on excluded experts' logits before the softmax. That is the exact
opt-out — the same function as a model merged without those experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from flexmoe.arch import DENSE_TYPES, MOE_TYPES, supported
from flexmoe.errors import FlexmoeError
from flexmoe.merge import BIAS, PUBLIC, read_merged_meta
from flexmoe.model import current_mask, install_routers, routers, routing, set_active_experts
from flexmoe.package import Manifest

MAX_CONFIG_BYTES = 1 << 20


def model_type(path: Path) -> str:
    """A MOE_TYPES entry for a merged model, a DENSE_TYPES entry for an anchor or dense expert
    (flexmoe.arch's table); any other directory is a one-line error (it would otherwise load
    partly random)."""
    from flexmoe.fsutil import read_json

    path = Path(path)
    if not path.is_dir():
        raise FlexmoeError(f"model directory not found: {path}")
    cfg = read_json(path / "config.json", f"{path}: config.json", MAX_CONFIG_BYTES)
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind not in MOE_TYPES and kind not in DENSE_TYPES:
        raise FlexmoeError(
            f"{path}: model_type {str(kind)[:40]!r} is neither a flexmoe merged model "
            f"({', '.join(MOE_TYPES)}) nor a dense anchor/expert (supported: {supported()})"
        )
    return kind


def _from_pretrained(cls, path: Path, what: str):
    """cls.from_pretrained, refusing a checkpoint that lacks weights the model needs (HF would
    initialise them randomly and run a partly random model)."""
    try:
        model, info = cls.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True, use_safetensors=True
        )
    except FlexmoeError:
        raise
    except Exception as e:
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        raise FlexmoeError(f"{path}: cannot load a {what} ({msg})") from None
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [
        k for k in info.get("missing_keys", []) if not (tied and k.endswith("lm_head.weight"))
    ]
    if missing or info.get("mismatched_keys"):
        bad = (missing or [str(x[0]) for x in info["mismatched_keys"]])[0]
        raise FlexmoeError(f"{path}: not a complete {what} (weight {bad} missing or mismatched)")
    unexpected = [k for k in info.get("unexpected_keys", []) if "rotary_emb" not in k]
    if unexpected:  # weights of another architecture, which the model would silently ignore
        raise FlexmoeError(f"{path}: not a {what} (weight {unexpected[0]} is not part of it)")
    return model


def load_dense(path: Path):
    """An anchor or dense expert, as the dense model it is."""
    path = Path(path)
    kind = model_type(path)
    if kind in MOE_TYPES:
        raise FlexmoeError(f"{path} is a merged model, not a dense one")
    return _from_pretrained(AutoModelForCausalLM, path, f"dense {kind} model").eval()


def load_model(path: Path, state: Path | None = None):
    """A merged model (load_merged) or a dense anchor/expert (load_dense), by its config."""
    return load_merged(path, state) if model_type(path) in MOE_TYPES else load_dense(path)


def is_merged(model) -> bool:
    return getattr(model.config, "model_type", None) in MOE_TYPES


def load_merged(path: Path, state: Path | None = None) -> PreTrainedModel:
    """A merged (or stock MoE of a supported family) directory → the stock MoE class with flexmoe
    routers, biases and names.

    Without flexmoe extras (a stock checkpoint) the bias is 0 and experts are named
    expert_0, expert_1, …. Experts whose consent has expired or was revoked (revocations.py:
    `state`, default MODEL.serve/) are withheld from the start (the active mask) and by every
    later expert choice (`expert_mask`), on every path that runs it.
    """
    from safetensors.torch import load_file

    from flexmoe import revocations
    from flexmoe.fsutil import regular_file

    path = Path(path)
    kind = model_type(path)
    if kind not in MOE_TYPES:
        raise FlexmoeError(f"{path} is a dense {kind} model, not a merged model")
    revoked = revocations.read_revoked(revocations.state_dir(path, state))
    meta = read_merged_meta(path) or {}
    model = _from_pretrained(AutoModelForCausalLM, path, f"{kind} model")
    install_routers(model)
    n = model.config.num_experts
    names = list(meta.get("experts") or [f"expert_{i}" for i in range(n)])
    if len(names) != n:
        raise FlexmoeError(f"{path}: {len(names)} expert names for {n} experts")
    rs = routers(model)
    if (path / BIAS).exists():
        f = regular_file(path / BIAS, f"{path}: {BIAS}", len(rs) * (n * 4 + 256) + 4096)
        try:
            bias = load_file(f)
        except Exception:
            raise FlexmoeError(f"{f}: not a valid safetensors file") from None
        with torch.no_grad():
            for i, r in enumerate(rs):
                b = bias.get(f"layers.{i}.bias")
                if b is None or tuple(b.shape) != (n,) or not torch.isfinite(b).all():
                    raise FlexmoeError(f"{path / BIAS}: bad or missing layers.{i}.bias")
                r.bias.copy_(b.float())
    model.flexmoe_experts = names
    model.flexmoe_domain_embeddings = _domain_embeddings(path, names)
    pre = meta.get("preselect")
    model.flexmoe_preselect = pre if pre and model.flexmoe_domain_embeddings else None
    model.flexmoe_router_tuned = bool(meta.get("router_tuned"))  # RT: see router_tune.py
    model.flexmoe_manifests = {
        k: Manifest.model_validate(v) for k, v in (meta.get("manifests") or {}).items()
    }
    model.flexmoe_withheld = {
        **{n: revocations.reason(t) for n, t in revoked.items() if n in names},
        **dict(consent_exclusions(model, None)),
    }
    if model.flexmoe_withheld:
        set_active_experts(model, torch.tensor([x not in model.flexmoe_withheld for x in names]))
    return model.eval()


def _domain_embeddings(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Each stored package's `domain_embedding` (the owner's mean document embedding), if any."""
    from safetensors import safe_open

    from flexmoe.merge import EXPERTS_DIR
    from flexmoe.package import OPTIONAL_TENSORS, WEIGHTS

    out = {}
    for n in names:
        f = path / EXPERTS_DIR / n / WEIGHTS
        if not f.is_file():
            continue
        try:
            with safe_open(f, framework="pt") as st:
                if "domain_embedding" not in st.keys():
                    continue
                shape = st.get_slice("domain_embedding").get_shape()
                if list(shape) != OPTIONAL_TENSORS["domain_embedding"]:
                    raise FlexmoeError(f"{f}: bad domain_embedding")
                t = st.get_tensor("domain_embedding").float()
        except Exception as e:  # a corrupt stored package: refuse, naming it
            raise FlexmoeError(f"{f}: unreadable ({type(e).__name__})") from None
        if list(t.shape) != OPTIONAL_TENSORS["domain_embedding"] or not torch.isfinite(t).all():
            raise FlexmoeError(f"{f}: bad domain_embedding")
        out[n] = t
    return out


PRESELECT_CONTEXT = 256  # tokens before a scored window that preselection reads (64 measured worse)


def preselect_hook(model, tokenizer, stream, m: int):
    """A before_batch hook for evaluate_bpb: each window keeps public + the m experts closest to
    the text of the PRESELECT_CONTEXT tokens BEFORE it (the scored window is never read)."""

    def choose(starts: list[int]):
        n = PRESELECT_CONTEXT
        texts = [
            tokenizer.decode(stream.window(max(x - n, 0), min(x, n)).tolist()) if x else ""
            for x in starts
        ]
        return routing(model, rows=preselect_mask(model, texts, m))

    return choose


def default_preselect(model) -> int | None:
    """The merged model's stored preselection (flexmoe_merged.json), None for token routing."""
    return getattr(model, "flexmoe_preselect", None)


def preselect_mask(
    model, texts: Sequence[str], m: int, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """(len(texts), E) bool: per text, the public expert plus the m ALLOWED experts whose domain
    embedding is most similar (cosine, all-MiniLM-L6-v2) to the text's embedding. Choosing among
    the allowed (not opted-out) experts only keeps opt-out exact: excluding an expert gives the
    same choice as never merging it. `allowed` defaults to the routers' active mask. Experts
    without a stored embedding cannot be scored and stay; an empty text keeps every expert."""
    from flexmoe.router_init import embed_texts

    if m < 1:
        raise FlexmoeError("--preselect must be ≥ 1")
    names = expert_names(model)
    if allowed is None:
        allowed = current_mask(model)
    emb = getattr(model, "flexmoe_domain_embeddings", {})
    scored = [i for i, n in enumerate(names) if n in emb and bool(allowed[i])]
    if not scored and not emb:
        raise FlexmoeError("--preselect: no expert in this model stores a domain embedding")
    mask = torch.ones(len(texts), len(names), dtype=torch.bool)
    if m >= len(scored):
        return mask
    keys = torch.nn.functional.normalize(torch.stack([emb[names[i]] for i in scored]), dim=-1)
    q = torch.from_numpy(embed_texts([t or " " for t in texts]))
    top = (q @ keys.T).topk(m, dim=-1).indices
    for b, t in enumerate(texts):
        if t.strip():
            mask[b, scored] = False
            mask[b, [scored[j] for j in top[b].tolist()]] = True
    return mask


def expert_names(model) -> list[str]:
    return list(
        getattr(model, "flexmoe_experts", None)
        or [f"expert_{i}" for i in range(model.config.num_experts)]
    )


def expert_mask(
    model,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_no_public: bool = False,
) -> torch.Tensor:
    """Names → bool mask over experts. `include` keeps the public expert; only `exclude` (with
    allow_no_public) drops it, because the public expert carries the shared anchor's knowledge."""
    names = expert_names(model)
    for what, given in (("include", include), ("exclude", exclude)):
        unknown = sorted(set(given or []) - set(names))
        if unknown:
            raise FlexmoeError(
                f"{what}: unknown expert(s) {', '.join(unknown)} (known: {', '.join(names)})"
            )
    # a stock MoE checkpoint's expert_0 is its public expert; a model merged without the
    # public expert (--allow-no-public) has none
    public = PUBLIC if PUBLIC in names else ("expert_0" if names[0] == "expert_0" else None)
    keep = (set(include) | {public} - {None}) if include else set(names)
    keep -= set(exclude or [])
    keep -= set(getattr(model, "flexmoe_withheld", {}))  # lapsed/revoked: never, on any path
    if public is not None and public not in keep and not allow_no_public:
        raise FlexmoeError(
            f"excluding the public expert '{public}' is refused (pass --allow-no-public)"
        )
    mask = torch.tensor([n in keep for n in names], dtype=torch.bool)
    if not mask.any():
        raise FlexmoeError("at least one expert must stay active")
    return mask


def consent_exclusions(model, use: str | None) -> list[tuple[str, str]]:
    """Experts whose stored consent no longer permits `use` (or has expired): checked at every
    request, so consent that lapses after the merge is still honoured."""
    if not is_merged(model):
        return []
    manifests: dict[str, Manifest] = getattr(model, "flexmoe_manifests", {})
    withheld: dict[str, str] = getattr(model, "flexmoe_withheld", {})  # incl. revocations
    out = []
    for name in expert_names(model):
        m = manifests.get(name)
        reason = withheld.get(name) or (m.consent.permits(use) if m is not None else None)
        if reason is not None:
            out.append((name, reason))
    return out


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    active: list[str]
    attribution: dict[str, float] | None = None
    per_layer: list[dict[str, float]] | None = None
    excluded: list[tuple[str, str]] = field(default_factory=list)


def _shares(index: torch.Tensor, value: torch.Tensor, n: int) -> torch.Tensor:
    """Total routing weight per expert; the sentinel index n ("no expert") is dropped."""
    total = torch.zeros(n + 1, dtype=torch.float64)
    total.index_add_(0, index.reshape(-1), value.reshape(-1).double())
    return total[:n]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    attribution: bool = False,
    per_layer: bool = False,
    seed: int | None = None,
    allow_no_public: bool = False,
    use: str | None = None,
    preselect: int | None = None,
) -> Generation:
    """Generate with the KV cache (greedy at temperature 0). Attribution is each expert's share
    of the routing weight at the positions that produced the GENERATED tokens (not the prompt).
    `preselect=M` keeps, besides the public expert, only the M experts whose domain embedding is
    closest to the prompt's; None uses the merged model's stored default, 0 turns it off. The
    expert choice (include/exclude, consent, preselection) holds for this call only: the model's
    previous mask is restored afterwards."""
    if max_new_tokens < 1:
        raise FlexmoeError("--max-new-tokens must be ≥ 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise FlexmoeError("need temperature ≥ 0 and 0 < top-p ≤ 1")
    if not is_merged(model):
        given = [
            flag
            for flag, v in (
                ("--include", include),
                ("--exclude", exclude),
                ("--attribution", attribution),
                ("--per-layer", per_layer),
                ("--use", use),
                ("--preselect", preselect),
            )
            if v
        ]
        if given:
            raise FlexmoeError(f"{', '.join(given)}: a dense model has no experts to choose")
    names = expert_names(model) if is_merged(model) else ["dense"]
    excluded = consent_exclusions(model, use)
    exclude = sorted(set(exclude or []) | {n for n, _ in excluded})
    mask = expert_mask(model, include, exclude, allow_no_public) if is_merged(model) else None
    preselect = default_preselect(model) if preselect is None else preselect
    if preselect:  # request-level: a function of the active set, so opt-out stays exact
        mask = mask & preselect_mask(model, [prompt], preselect, allowed=mask)[0]
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    ctx = routing(model, mask=mask, record=attribution or per_layer) if mask is not None else None
    with ctx or nullcontext([]) as records:
        if seed is not None:
            torch.manual_seed(seed)
        sample = temperature > 0
        device = next(model.parameters()).device
        out = model.generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ).cpu()
    record = bool(attribution or per_layer) and mask is not None
    new = out[0, ids.shape[1] :].tolist()
    result = Generation(
        text=tokenizer.decode(new, skip_special_tokens=True),
        token_ids=new,
        prompt_ids=ids[0].tolist(),
        active=names if mask is None else [n for n, a in zip(names, mask, strict=True) if a],
        excluded=excluded,
    )
    if record and new:
        n = len(names)
        layer_tot = []
        for recs in records:  # one router (layer): a (rows, k) record per forward call
            index = torch.cat([i for i, _ in recs])[-len(new) :].cpu()  # rows → new tokens
            value = torch.cat([v for _, v in recs])[-len(new) :].cpu()
            layer_tot.append(_shares(index, value, n))
        total = torch.stack(layer_tot).sum(0)
        if attribution:
            result.attribution = dict(zip(names, (total / total.sum()).tolist(), strict=True))
        if per_layer:
            result.per_layer = [
                dict(zip(names, (t / t.sum()).tolist(), strict=True)) for t in layer_tot
            ]
    return result
