"""Merging: one FlexOlmo MoE from the public anchor plus N independently trained expert packages.

Expert 0 is the public expert (the anchor's FFN, router row `public.<router_init>`); experts
1..N are the packages' FFNs in order. Router rows are concatenated public first, so opting an
expert out is dropping its row (or masking its logit): no retraining, nothing else moves.

A merged directory is
- a stock `save_pretrained` FlexOlmo checkpoint (model_type `flex_olmo`) plus the tokenizer:
  stock `AutoModelForCausalLM.from_pretrained` loads it;
- `flexmoe_bias.safetensors`: the per-layer router bias vectors `layers.{i}.bias` (E,), ≤ 0.
  Stock transformers' FlexOlmo router has no bias, so the stock-loadable export simply omits it:
  a stock loader runs the model with b = 0 (scripts measure what that costs); `infer.load_merged`
  restores it;
- `flexmoe_merged.json`: expert names in order, anchor fingerprint, every manifest, top-k,
  router init and what was excluded and why;
- `experts/<name>/`: a verbatim copy of each package, so a merged model can be re-verified and
  rebuilt (`--base`, `--add`, `--remove`) without the original package directories.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import FlexOlmoForCausalLM, Olmo2ForCausalLM

from flexmoe.errors import FlexmoeError
from flexmoe.fsutil import atomic_dir, write_json
from flexmoe.model import routers, upcycle
from flexmoe.package import MANIFEST, WEIGHTS, Manifest, verify_package

MERGED = "flexmoe_merged.json"
BIAS = "flexmoe_bias.safetensors"
EXPERTS_DIR = "experts"
PUBLIC = "public"
MAX_DEFAULT_TOP_K = 4  # the paper: quality rises with k up to ~4, then plateaus
DEFAULT_PRESELECT = 1  # measured best at demo scale (README: selective experts)


@dataclass
class MergeResult:
    path: Path
    experts: list[str]
    top_k: int
    excluded: list[tuple[str, str]] = field(default_factory=list)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def default_top_k(num_experts: int) -> int:
    return min(num_experts, MAX_DEFAULT_TOP_K)


@torch.no_grad()
def build_merged(
    anchor_model: Olmo2ForCausalLM,
    anchor_record: dict,
    anchor_extras: dict[str, torch.Tensor],
    packages: Sequence[tuple[Manifest, dict[str, torch.Tensor]]],
    top_k: int | None = None,
    include_public: bool = True,
) -> FlexOlmoForCausalLM:
    """The merged MoE (packages must already be verified against this anchor)."""
    for m, _ in packages:
        if m.anchor_fingerprint != anchor_record["fingerprint"]:
            raise FlexmoeError(f"expert '{m.name}' was built on a different anchor")
    inits = {m.router_init for m, _ in packages}
    if len(inits) > 1:
        raise FlexmoeError(f"experts use different router inits ({', '.join(sorted(inits))})")
    router_init = inits.pop() if inits else "domain"
    n = len(packages) + int(include_public)
    if n == 0:
        raise FlexmoeError("nothing to merge: no public expert and no packages")
    k = default_top_k(n) if top_k is None else top_k
    if not 1 <= k <= n:
        raise FlexmoeError(f"--top-k {k} must be between 1 and the number of experts ({n})")
    public = anchor_extras.get(f"public.{router_init}")
    cfg = anchor_model.config
    if include_public and (
        public is None or tuple(public.shape) != (cfg.num_hidden_layers, cfg.hidden_size)
    ):
        raise FlexmoeError(f"the anchor has no usable public router rows for '{router_init}'")
    model = upcycle(anchor_model, n, k)
    for i, (layer, r) in enumerate(zip(model.model.layers, routers(model), strict=True)):
        experts = layer.mlp.experts
        rows = [public[i]] if include_public else []
        bias = [torch.zeros(())] if include_public else []
        for e, (_, t) in enumerate(packages, start=int(include_public)):
            p = f"layers.{i}"
            experts.gate_up_proj[e] = torch.cat([t[f"{p}.gate_proj"], t[f"{p}.up_proj"]], 0)
            experts.down_proj[e] = t[f"{p}.down_proj"]
            rows.append(t[f"{p}.router"])
            bias.append(t[f"{p}.bias"].reshape(()))
        r.weight.copy_(torch.stack(rows))
        r.bias.copy_(torch.stack(bias))
    model.flexmoe_experts = [PUBLIC] * include_public + [m.name for m, _ in packages]
    model.flexmoe_manifests = {m.name: m for m, _ in packages}
    return model.eval()


def stock_state_dict(model: FlexOlmoForCausalLM) -> dict[str, torch.Tensor]:
    """The model's state without flexmoe's router bias: exactly what stock FlexOlmo expects."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith(".mlp.gate.bias")}


def _select(
    names: list[str],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    allow_no_public: bool,
) -> set[str]:
    known = set(names)
    for what, given in (("--include", include), ("--exclude", exclude)):
        unknown = sorted(set(given or []) - known)
        if unknown:
            raise FlexmoeError(
                f"{what}: unknown expert(s) {', '.join(unknown)} (known: {', '.join(names)})"
            )
    chosen = (set(include) | {PUBLIC}) if include else set(names)  # public goes only by exclude
    chosen -= set(exclude or [])
    if PUBLIC not in chosen and not allow_no_public:
        raise FlexmoeError("excluding the public expert is refused (pass --allow-no-public)")
    return chosen


def merge(
    anchor_dir: Path,
    package_dirs: Sequence[Path],
    out: Path,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    top_k: int | None = None,
    use: str | None = None,
    allow_no_public: bool = False,
    base: Path | None = None,
    add: Sequence[Path] = (),
    remove: Sequence[str] = (),
    log: Callable[[str], None] | None = _stderr,
    preselect: int | None = -1,
) -> MergeResult:
    """Verify every package, apply the name and consent policy, build and write atomically.

    With `base`, the base's stored experts (minus `remove`) keep their order and the new packages
    (`package_dirs` + `add`) are appended: the result equals merging that list from scratch.
    `preselect`: the stored default of request-level preselection (infer.preselect_mask): -1 =
    DEFAULT_PRESELECT when every kept package has a domain embedding, else token routing alone;
    0/None = token routing alone; M ≥ 1 = keep public + M experts per request.
    """
    from flexmoe.anchor import load_anchor
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.records import library_versions

    log = log or (lambda _msg: None)
    anchor_model, record, extras = load_anchor(Path(anchor_dir))
    dirs = _package_list(base, record, remove) + [Path(p) for p in (*package_dirs, *add)]
    verified = [verify_package(p, record, extras, anchor_model.config) for p in dirs]
    names = [m.name for m, _ in verified]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FlexmoeError(f"expert names must be unique; repeated: {', '.join(dupes)}")
    if PUBLIC in names:
        raise FlexmoeError(f"'{PUBLIC}' is reserved for the anchor's expert")
    chosen = _select([PUBLIC, *names], include, exclude, allow_no_public)
    excluded: list[tuple[str, str]] = []
    kept: list[tuple[Path, Manifest, dict[str, torch.Tensor]]] = []
    for p, (m, t) in zip(dirs, verified, strict=True):
        reason = m.consent.permits(use) if m.name in chosen else "excluded by name"
        if reason is None:
            kept.append((p, m, t))
        else:
            excluded.append((m.name, reason))
            log(f"excluded expert '{m.name}': {reason}")
    include_public = PUBLIC in chosen
    model = build_merged(
        anchor_model,
        record,
        extras,
        [(m, t) for _, m, t in kept],
        top_k,
        include_public=include_public,
    )
    expert_names = [PUBLIC] * include_public + [m.name for _, m, _ in kept]
    embedded = bool(kept) and all("domain_embedding" in t for _, _, t in kept)
    if preselect == -1:
        preselect = DEFAULT_PRESELECT if embedded else None
    elif preselect and not embedded:
        raise FlexmoeError("--preselect needs every expert package to store a domain embedding")
    meta = {
        "format": "flexmoe-merged",
        "schema_version": 1,
        "experts": expert_names,
        "anchor_fingerprint": record["fingerprint"],
        "top_k": model.config.num_experts_per_tok,
        "preselect": preselect or None,
        "router_init": kept[0][1].router_init if kept else None,
        "manifests": {m.name: json.loads(m.model_dump_json()) for _, m, _ in kept},
        "excluded": [list(x) for x in excluded],
        "use": use,
        "libraries": library_versions(),
    }
    tok = load_tokenizer(anchor_dir)
    save_merged(out, model, tok, meta, [(m.name, p) for p, m, _ in kept])
    return MergeResult(Path(out), expert_names, model.config.num_experts_per_tok, excluded)


def save_merged(
    out: Path,
    model: FlexOlmoForCausalLM,
    tokenizer,
    meta: dict,
    packages: Sequence[tuple[str, Path]],
) -> None:
    """Write a merged directory atomically: stock checkpoint, tokenizer, router biases, the
    verbatim package copies (name, package dir) and the metadata. Shared with router tuning."""
    from safetensors.torch import save_file

    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, state_dict=stock_state_dict(model))
        tokenizer.save_pretrained(tmp)
        save_file(
            {
                f"layers.{i}.bias": r.bias.detach().clone().contiguous()
                for i, r in enumerate(routers(model))
            },
            tmp / BIAS,
        )
        for name, p in packages:
            dst = tmp / EXPERTS_DIR / name
            dst.mkdir(parents=True)
            for f in (WEIGHTS, MANIFEST):
                shutil.copyfile(Path(p) / f, dst / f)
        write_json(tmp / MERGED, meta)


def _package_list(base: Path | None, anchor_record: dict, remove: Sequence[str]) -> list[Path]:
    """The stored package dirs of a merged base, in expert order, minus `remove`."""
    if base is None:
        if remove:
            raise FlexmoeError("--remove needs --base (the merged model to remove from)")
        return []
    base = Path(base)
    meta = read_merged_meta(base)
    if meta is None:
        raise FlexmoeError(f"{base}: not a flexmoe merged model (no {MERGED})")
    if meta["anchor_fingerprint"] != anchor_record["fingerprint"]:
        raise FlexmoeError(f"{base} was merged on a different anchor")
    stored = [n for n in meta["experts"] if n != PUBLIC]
    unknown = sorted(set(remove) - set(stored))
    if unknown:
        raise FlexmoeError(f"--remove: {base} has no expert(s) {', '.join(unknown)}")
    return [base / EXPERTS_DIR / n for n in stored if n not in set(remove)]


def read_merged_meta(path: Path) -> dict | None:
    p = Path(path) / MERGED
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FlexmoeError(f"{p}: not valid JSON ({e})") from None
