"""The merged model directory: a stock HF MoE checkpoint plus flexmoe's extras (router bias, expert
names, stored packages and manifests) — writing it and loading it back."""

from __future__ import annotations

import shutil
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from flexmoe.errors import FlexmoeError
from flexmoe.model.arch import MOE_TYPES
from flexmoe.model.router import install_routers, routers, set_active_experts
from flexmoe.store import revocations
from flexmoe.store.checkpoint import _from_pretrained, load_dense, model_type
from flexmoe.store.fsutil import atomic_dir, read_json, regular_file, write_json
from flexmoe.store.model_card import CARD, merged_card
from flexmoe.store.package import (
    MANIFEST,
    NAME_RE,
    WEIGHTS,
    Manifest,
    optional_shapes,
)
from flexmoe.store.signing import SIGNATURE

MERGED = "flexmoe_merged.json"

BIAS = "flexmoe_bias.safetensors"

EXPERTS_DIR = "experts"

PUBLIC = "public"

MAX_EXPERTS = 256


@dataclass
class ExpertTable:
    """What flexmoe knows about a loaded model's experts, beside the HF object (never attributes
    set on it): names in router order, stored manifests, domain embeddings, hidden centroids
    and MiniLM prototypes (preselection), the stored
    preselection default, whether routers were tuned, and the experts withheld at load
    (name → reason: consent lapsed or revoked), which no expert choice can bring back."""

    names: list[str]
    manifests: dict[str, Manifest] = field(default_factory=dict)
    domain_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden_centroids: dict[str, torch.Tensor] = field(default_factory=dict)
    domain_prototypes: dict[str, torch.Tensor] = field(default_factory=dict)
    preselect: int | None = None
    preselect_hidden: bool = False  # preselection also reads hidden centroids (merge option)
    router_tuned: bool = False
    withheld: dict[str, str] = field(default_factory=dict)


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def experts_of(model) -> ExpertTable:
    """The model's expert table; a model loaded without one (a stock MoE built in memory) gets
    the stock names expert_0, expert_1, …; a dense model has no experts."""
    table = _TABLES.get(model)
    if table is None:
        n = getattr(model.config, "num_experts", 0) if is_merged(model) else 0
        table = _TABLES[model] = ExpertTable([f"expert_{i}" for i in range(n)])
    return table


MAX_MERGED_META_BYTES = 64 << 20  # MAX_EXPERTS manifests of MAX_MANIFEST_BYTES each


def stock_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's state without flexmoe's router bias: exactly what the stock MoE class expects."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith(".mlp.gate.bias")}


def write_merged_files(tmp: Path, model: PreTrainedModel, tokenizer, meta: dict) -> None:
    """Stock checkpoint, tokenizer, router biases and metadata into a directory being built."""
    from safetensors.torch import save_file

    model.save_pretrained(tmp, state_dict=stock_state_dict(model))
    tokenizer.save_pretrained(tmp)
    save_file(
        {
            f"layers.{i}.bias": r.bias.detach().clone().contiguous()
            for i, r in enumerate(routers(model))
        },
        tmp / BIAS,
    )
    write_json(tmp / MERGED, meta)
    (tmp / CARD).write_text(merged_card(meta, model.config.model_type))


def save_merged(
    out: Path,
    model: PreTrainedModel,
    tokenizer,
    meta: dict,
    packages: Sequence[tuple[str, Path]],
) -> None:
    """Write a merged directory atomically: stock checkpoint, tokenizer, router biases, copies of
    stored packages (name, package dir; from another merged dir) and the metadata. Used by
    router tuning and the unrestricted baseline."""
    with atomic_dir(out, overwrite=True) as tmp:
        for name, p in packages:
            dst = tmp / EXPERTS_DIR / name
            dst.mkdir(parents=True)
            for f in (WEIGHTS, MANIFEST, SIGNATURE):
                if (Path(p) / f).is_file():
                    shutil.copyfile(Path(p) / f, dst / f)
        write_merged_files(tmp, model, tokenizer, meta)


def read_merged_meta(path: Path) -> dict | None:
    """flexmoe_merged.json of a merged directory (None if there is none), bounded and checked:
    expert names are names (never paths), the types of every field the code reads."""
    import re

    p = Path(path) / MERGED
    if not (p.exists() or p.is_symlink()):
        return None
    meta = read_json(p, MERGED, MAX_MERGED_META_BYTES)

    def bad(what: str) -> FlexmoeError:
        return FlexmoeError(f"{p}: {what}")

    if not isinstance(meta, dict) or meta.get("format") != "flexmoe-merged":
        raise bad("not flexmoe merged-model metadata")
    experts = meta.get("experts")
    if not isinstance(experts, list) or not 1 <= len(experts) <= MAX_EXPERTS + 1:
        raise bad(f"'experts' must be a list of 1..{MAX_EXPERTS + 1} names")
    for n in experts:
        if not isinstance(n, str) or not re.fullmatch(NAME_RE, n):
            raise bad(f"expert name {str(n)[:40]!r} is not a valid name")
    if len(set(experts)) != len(experts):
        raise bad("expert names repeat")
    fp = meta.get("anchor_fingerprint")
    if not isinstance(fp, str) or not re.fullmatch(r"[0-9a-f]{64}", fp):
        raise bad("'anchor_fingerprint' is not a sha256")
    top_k = meta.get("top_k")
    if type(top_k) is not int or not 1 <= top_k <= len(experts):
        raise bad("'top_k' must be an integer between 1 and the number of experts")
    pre = meta.get("preselect")
    if pre is not None and (type(pre) is not int or pre < 1):
        raise bad("'preselect' must be an integer ≥ 1")
    manifests = meta.get("manifests") or {}
    if not isinstance(manifests, dict) or not set(manifests) <= set(experts):
        raise bad("'manifests' must map stored expert names to manifests")
    try:
        for v in manifests.values():
            Manifest.model_validate(v)
    except Exception:  # pydantic ValidationError: one line, no echo of the hostile value
        raise bad("a stored manifest is invalid") from None
    return meta


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
    shapes = optional_shapes(model.config.hidden_size)
    embeddings = _statistic(path, names, "domain_embedding", shapes["domain_embedding"])
    centroids = _statistic(path, names, "hidden_centroid", shapes["hidden_centroid"])
    protos = _statistic(path, names, "domain_prototypes", shapes["domain_prototypes"])
    pre = meta.get("preselect")
    manifests = {k: Manifest.model_validate(v) for k, v in (meta.get("manifests") or {}).items()}
    lapsed = {n: m.consent.permits(None) for n, m in manifests.items()}
    table = _TABLES[model] = ExpertTable(
        names,
        manifests,
        embeddings,
        centroids,
        protos,
        preselect=pre if pre and embeddings else None,
        preselect_hidden=bool(meta.get("preselect_hidden")),
        router_tuned=bool(meta.get("router_tuned")),  # RT: see lifecycle/router_tune.py
        withheld={
            **{n: revocations.reason(t) for n, t in revoked.items() if n in names},
            **{n: r for n, r in lapsed.items() if r is not None},
        },
    )
    if table.withheld:
        set_active_experts(model, torch.tensor([x not in table.withheld for x in names]))
    return model.eval()


def _statistic(path: Path, names: list[str], key: str, shape: list[int]) -> dict[str, torch.Tensor]:
    """Each stored package's statistic `key` (package.STATISTICS), if any."""
    from safetensors import safe_open

    out = {}
    for n in names:
        f = path / EXPERTS_DIR / n / WEIGHTS
        if not f.is_file():
            continue
        try:
            with safe_open(f, framework="pt") as st:
                if key not in st.keys():
                    continue
                if list(st.get_slice(key).get_shape()) != shape:
                    raise FlexmoeError(f"{f}: bad {key}")
                t = st.get_tensor(key).float()
        except Exception as e:  # a corrupt stored package: refuse, naming it
            raise FlexmoeError(f"{f}: unreadable ({type(e).__name__})") from None
        if list(t.shape) != shape or not torch.isfinite(t).all():
            raise FlexmoeError(f"{f}: bad {key}")
        out[n] = t
    return out
