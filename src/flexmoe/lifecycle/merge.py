"""Merging: one mixture-of-experts (the anchor family's stock MoE class, flexmoe.model.arch) from
the public anchor plus N independently trained expert packages.

Expert 0 is the public expert (the anchor's FFN, router row `public.<router_init>`); experts
1..N are the packages' FFNs in order. Router rows are concatenated public first, so opting an
expert out is dropping its row (or masking its logit): no retraining, nothing else moves.

A merged directory is
- a stock `save_pretrained` checkpoint of the MoE class (FlexOlmo, Mixtral or Qwen3-MoE) plus the
  tokenizer: stock `AutoModelForCausalLM.from_pretrained` loads it;
- `flexmoe_bias.safetensors`: the per-layer router bias vectors `layers.{i}.bias` (E,), ≤ 0.
  Stock transformers' MoE routers have no bias, so the stock-loadable export simply omits it:
  a stock loader runs the model with b = 0 (scripts measure what that costs);
  `store.merged.load_merged` restores it. On families whose row drops the bias
  (model.arch `router_bias`) every bias is 0 and the stock load is exact;
- `flexmoe_merged.json`: expert names in order, anchor fingerprint, every manifest, top-k,
  router init and what was excluded and why;
- `experts/<name>/`: a verbatim copy of each package, so a merged model can be re-verified and
  rebuilt (`--base`, `--add`, `--remove`) without the original package directories.

Packages are copied into the new output first (bounded reads), and only the copies are verified
and used: a package changed after verification can never be stored unverified. Before the output
appears, a probe forward with each expert active checks the merged model's logits are finite.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexmoeError
from flexmoe.model.arch import family_of
from flexmoe.model.moe import upcycle
from flexmoe.model.router import routers, routing
from flexmoe.selection import choose
from flexmoe.store import revocations
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.fsutil import atomic_dir, copy_bounded, guard_output
from flexmoe.store.merged import (
    EXPERTS_DIR,
    MAX_EXPERTS,
    MERGED,
    PUBLIC,
    experts_of,
    read_merged_meta,
    write_merged_files,
)
from flexmoe.store.package import (
    MANIFEST,
    MAX_HEADER_BYTES,
    MAX_MANIFEST_BYTES,
    WEIGHTS,
    Architecture,
    Manifest,
    dp_record,
    expected_bytes,
    expected_shapes,
    optional_shapes,
    verify_package,
)
from flexmoe.store.records import library_versions
from flexmoe.store.signing import SIGNATURE, check_trusted, load_trusted_keys, read_signature

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
    anchor_model: PreTrainedModel,
    anchor_record: dict,
    anchor_extras: dict[str, torch.Tensor],
    packages: Sequence[tuple[Manifest, dict[str, torch.Tensor]]],
    top_k: int | None = None,
    include_public: bool = True,
) -> PreTrainedModel:
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
    experts_of(model).names = [PUBLIC] * include_public + [m.name for m, _ in packages]
    experts_of(model).manifests = {m.name: m for m, _ in packages}
    return model.eval()


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
    preselect_hidden: bool = False,
    overwrite: bool = False,
    trusted_keys: Path | None = None,
    max_epsilon: float | None = None,
    router_bias: bool | None = None,
) -> MergeResult:
    """Copy, verify, apply the name and consent policy, build, probe and write atomically.

    With `base`, the base's stored experts (minus `remove`) keep their order and the new packages
    (`package_dirs` + `add`) are appended: the result equals merging that list from scratch.
    `preselect`: the stored default of request-level preselection (inference.preselect): -1 =
    DEFAULT_PRESELECT when every kept package has a domain embedding, else token routing alone;
    0/None = token routing alone; M ≥ 1 = keep public + M experts per request.
    `trusted_keys`: admit only packages signed by one of these keys (signing.py).
    `max_epsilon`: admit only packages trained with DP-SGD at ε ≤ max_epsilon (dp.py).
    `router_bias`: keep the packages' router biases (None: the family's rule, model.arch).
    """

    log = log or (lambda _msg: None)
    sources = [Path(p) for p in (*package_dirs, *add)]
    out = guard_output(out, "merged model", [anchor_dir, base, *sources], overwrite)
    trusted = None
    if trusted_keys is not None:
        trusted = load_trusted_keys(Path(trusted_keys))
    # experts revoked on the model this output replaces or the base it extends stay out
    revoked: dict[str, str] = {}
    for served in (base, out):
        if served is not None:
            revoked |= revocations.read_revoked(revocations.state_dir(served))
    anchor_model, record, extras = load_anchor(Path(anchor_dir))
    dirs = _package_list(base, record, remove) + sources
    if len(dirs) > MAX_EXPERTS:
        raise FlexmoeError(f"at most {MAX_EXPERTS} experts can be merged, got {len(dirs)}")
    tok = load_tokenizer(anchor_dir)
    with atomic_dir(out, overwrite=True) as tmp:
        stage = tmp / EXPERTS_DIR
        copies = [
            stage_package(p, stage / f".incoming-{i}", anchor_model.config)
            for i, p in enumerate(dirs)
        ]
        verified = [verify_package(c, record, extras, anchor_model) for c in copies]
        names = [m.name for m, _ in verified]
        if max_epsilon is not None:
            for m, _ in verified:
                rec = dp_record(m)
                if rec is None:
                    raise FlexmoeError(f"expert '{m.name}' was not trained with DP (--max-epsilon)")
                if rec["epsilon"] > max_epsilon:
                    raise FlexmoeError(
                        f"expert '{m.name}' has ε = {rec['epsilon']:.3g} > --max-epsilon "
                        f"{max_epsilon:g}"
                    )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise FlexmoeError(f"expert names must be unique; repeated: {', '.join(dupes)}")
        signers = {}
        for c, (m, _) in zip(copies, verified, strict=True):
            signer = _signer(c, trusted)
            if signer is not None:
                signers[m.name] = {"key_id": signer.key_id, "public_key": signer.public_key}
        chosen = choose([PUBLIC, *names], include, exclude, allow_no_public=allow_no_public)
        excluded: list[tuple[str, str]] = []
        kept: list[tuple[Path, Manifest, dict[str, torch.Tensor]]] = []
        for c, (m, t) in zip(copies, verified, strict=True):
            reason = m.consent.permits(use) if m.name in chosen else "excluded by name"
            if m.name in revoked:
                reason = revocations.reason(revoked[m.name])
            if reason is None:
                kept.append((c, m, t))
            else:
                excluded.append((m.name, reason))
        if dirs and not kept:
            raise FlexmoeError(
                "every expert was excluded ("
                + "; ".join(f"{n}: {r}" for n, r in excluded)
                + "): nothing to merge"
            )
        for name, reason in excluded:
            log(f"excluded expert '{name}': {reason}")
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
        fam = family_of(model.config.model_type)
        keep_bias = fam.router_bias if router_bias is None else router_bias
        if not keep_bias:
            with torch.no_grad():
                for r in routers(model):
                    r.bias.zero_()
            if router_bias is None and kept:
                log(f"router biases dropped (b = 0: the {fam.name} row's rule, model/arch.py)")
        probe(model, expert_names)
        embedded = bool(kept) and all("domain_embedding" in t for _, _, t in kept)
        if preselect == -1:
            preselect = DEFAULT_PRESELECT if embedded else None
        elif preselect and not embedded:
            raise FlexmoeError("--preselect needs every expert package to store a domain embedding")
        if preselect_hidden and not (preselect and all("hidden_centroid" in t for _, _, t in kept)):
            raise FlexmoeError(
                "--preselect-hidden needs preselection and every package to store a hidden "
                "centroid (`expert centroid` adds one)"
            )
        meta = {
            "format": "flexmoe-merged",
            "schema_version": 1,
            "experts": expert_names,
            "anchor_fingerprint": record["fingerprint"],
            "top_k": model.config.num_experts_per_tok,
            "preselect": preselect or None,
            "preselect_hidden": preselect_hidden,
            "router_bias": keep_bias,
            "router_init": kept[0][1].router_init if kept else None,
            "manifests": {m.name: json.loads(m.model_dump_json()) for _, m, _ in kept},
            "signers": {n: s for n, s in signers.items() if n in expert_names},
            "excluded": [list(x) for x in excluded],
            "use": use,
            "libraries": library_versions(),
        }
        for c, m, _ in kept:
            c.rename(stage / m.name)
        for c in copies:
            if c.exists():
                shutil.rmtree(c)
        if stage.exists() and not any(stage.iterdir()):
            stage.rmdir()
        write_merged_files(tmp, model, tok, meta)
    return MergeResult(Path(out), expert_names, model.config.num_experts_per_tok, excluded)


def _signer(pkg: Path, trusted: dict[str, str] | None):

    return check_trusted(pkg, trusted) if trusted is not None else read_signature(pkg)


def stage_package(src: Path, dst: Path, config) -> Path:
    """Copy a package's files into `dst` with reads bounded by what the anchor's shapes imply;
    the copy is what gets verified and stored."""
    src = Path(src)
    if not src.is_dir():
        raise FlexmoeError(f"expert package not found (not a directory): {src}")
    arch = Architecture(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
    )
    optional = optional_shapes(arch.hidden_size)
    weights = expected_bytes(expected_shapes(arch) | optional) + MAX_HEADER_BYTES + 8
    dst.mkdir(parents=True)
    for f, limit, required in (
        (MANIFEST, MAX_MANIFEST_BYTES, True),
        (WEIGHTS, weights, True),
        (SIGNATURE, 4096, False),
    ):
        if required or (src / f).exists():
            copy_bounded(src / f, dst / f, limit, f"{src}: {f}")
    return dst


@torch.no_grad()
def probe(model: PreTrainedModel, names: Sequence[str]) -> None:
    """A fixed short forward with each expert active in turn (with the public expert): a merged
    model whose logits are not finite is never written."""
    n = len(names)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for e in range(n):
        mask[e, e] = True
        if PUBLIC in names:
            mask[e, names.index(PUBLIC)] = True
    ids = (torch.arange(16) * 7919 % model.config.vocab_size).expand(n, -1)
    with routing(model, rows=mask):
        logits = model(ids.to(next(model.parameters()).device)).logits
    bad = [names[e] for e in range(n) if not torch.isfinite(logits[e]).all()]
    if bad:
        raise FlexmoeError(
            f"the merged model gives non-finite logits with expert(s) {', '.join(bad)}: not written"
        )


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
