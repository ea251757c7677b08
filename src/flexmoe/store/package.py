"""Expert packages: the only thing a data owner ships. Weights and a manifest, never data.

A package is a directory with
- `expert.safetensors`: per layer i, `layers.{i}.gate_proj` (I,H), `layers.{i}.up_proj` (I,H),
  `layers.{i}.down_proj` (H,I), `layers.{i}.router` (H,) and `layers.{i}.bias` () ≤ 0;
  optionally `domain_embedding` (384,): the mean all-MiniLM-L6-v2 embedding of the owner's
  documents, `domain_prototypes` (8, 384): k-means centres of those embeddings (one owner's data
  is rarely one topic: a mean can sit far from all of it), and `hidden_centroid` (H,): the mean
  of the anchor's mid-layer hidden states over them (model/hidden.py); statistics of the owner's
  data, used for request-level preselection;
- `manifest.json`: who, what, under which consent, built on which anchor, how, and the sha256 of
  every tensor.
Packages are untrusted input: `verify_package` checks everything before any tensor is used, and
bounds every read before it allocates: the manifest's bytes, nesting and strings, and the weight
file's size against the size the anchor's shapes imply (safetensors header parsed first).

Scale rule (finite but absurd weights make a merged model's logits NaN/Inf): every FFN matrix's
max |w| must be ≤ MAX_FFN_SCALE × the anchor's max |w| of the same matrix in that layer (trained
demo packages measure ≤ 1.4×); router rows |r| ≤ MAX_ROUTER_ABS; biases in [−MAX_BIAS_ABS, 0]; a
domain embedding, a hidden centroid and each prototype (means of unit vectors) have norm ≤ 1.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flexmoe.errors import FlexmoeError
from flexmoe.model.arch import family_of
from flexmoe.store.fsutil import atomic_dir, read_json, regular_file, write_json
from flexmoe.store.model_card import CARD, package_card

MANIFEST = "manifest.json"
WEIGHTS = "expert.safetensors"
SCHEMA_VERSION = 1
NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,63}$"
RESERVED_NAMES = ("public",)  # the anchor's expert in every merged model
USES = ("research", "commercial")
# optional, computed from the owner's data
STATISTICS = ("domain_embedding", "domain_prototypes", "hidden_centroid")
PROTOTYPES = 8  # rows of domain_prototypes


def optional_shapes(hidden_size: int) -> dict[str, list[int]]:
    """The optional tensors of a package (STATISTICS) and their shapes."""
    return {
        "domain_embedding": [384],
        "domain_prototypes": [PROTOTYPES, 384],
        "hidden_centroid": [hidden_size],
    }


MAX_MANIFEST_BYTES = 256 * 1024
MAX_TEXT = 200  # characters of domain, owner, licence
MAX_HEADER_BYTES = 1 << 20  # a safetensors header (the tensor table)
MAX_FFN_SCALE = 100.0
MAX_ROUTER_ABS = 1e3
MAX_BIAS_ABS = 1e3


class Consent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allowed_uses: list[Literal["research", "commercial"]] = Field(min_length=1)
    expires: dt.date | None = None

    def permits(self, use: str | None, today: dt.date | None = None) -> str | None:
        """None if allowed, else the reason it is not."""
        today = today or dt.date.today()
        if self.expires is not None and self.expires < today:
            return f"consent expired on {self.expires.isoformat()}"
        if use is not None and use not in self.allowed_uses:
            return f"use '{use}' not allowed (allowed: {', '.join(self.allowed_uses)})"
        return None


class Architecture(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_type: Literal["flex_olmo", "mixtral", "qwen3_moe"] = "flex_olmo"
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    hidden_act: str = "silu"


class TensorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int]
    dtype: Literal["float32"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class TrainingRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: int = Field(ge=0)
    steps: int = Field(ge=0)
    seed: int
    hyperparameters: dict
    heldout_bpb: float | None = None
    anchor_heldout_bpb: float | None = None


FFN = ("gate_proj", "up_proj", "down_proj")


class Compression(BaseModel):
    """A low-rank package (`expert compress`, after FlexMoRE): each FFN matrix stored as the
    anchor's plus U·V, the truncated SVD of (expert − anchor). Verification materialises the
    full matrices from the anchor, so merge, opt-out and export see an ordinary expert."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["svd-delta"] = "svd-delta"
    ranks: dict[str, int]  # "layers.{i}.{proj}" → rank of its stored delta
    energy: float = Field(ge=0.0, le=1.0)  # retained share of the deltas' squared norm
    parameters_full: int = Field(gt=0)
    parameters_stored: int = Field(gt=0)


def max_rank(out_features: int, in_features: int) -> int:
    """The largest rank worth storing: U·V no larger than the full matrix (keeps every bound
    computed from the anchor's shapes valid)."""
    return max(1, (out_features * in_features) // (out_features + in_features))


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["flexmoe-expert-package"] = "flexmoe-expert-package"
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=NAME_RE)
    domain: str = Field(min_length=1, max_length=MAX_TEXT)
    owner: str = Field(min_length=1, max_length=MAX_TEXT)
    licence: str = Field(min_length=1, max_length=MAX_TEXT)
    consent: Consent
    anchor_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    public_router_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    architecture: Architecture
    router_init: Literal["domain", "random", "hidden"]
    training: TrainingRecord
    tensors: dict[str, TensorInfo]
    created_with: dict[str, str] = {}
    compression: Compression | None = None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in RESERVED_NAMES:
            raise ValueError(f"'{v}' is reserved for the anchor's expert")
        return v


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(
        t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    ).hexdigest()


def expected_shapes(
    arch: Architecture, compression: Compression | None = None
) -> dict[str, list[int]]:
    """The stored tensors: per layer the owner's FFN (or, compressed, `NAME.u` [out, r] and
    `NAME.v` [r, in] for each matrix), the router row and the bias."""
    h, i = arch.hidden_size, arch.intermediate_size
    shapes = {}
    for layer in range(arch.num_hidden_layers):
        p = f"layers.{layer}"
        ffn = {f"{p}.gate_proj": [i, h], f"{p}.up_proj": [i, h], f"{p}.down_proj": [h, i]}
        if compression is not None:
            lowrank = {}
            for name, (o, n) in ffn.items():
                r = compression.ranks.get(name)
                if not isinstance(r, int) or not 1 <= r <= max_rank(o, n):
                    raise FlexmoeError(
                        f"compression rank of '{name}' must be 1..{max_rank(o, n)}, got {r!s:.20}"
                    )
                lowrank |= {f"{name}.u": [o, r], f"{name}.v": [r, n]}
            ffn = lowrank
        shapes |= ffn | {f"{p}.router": [h], f"{p}.bias": []}
    if compression is not None:
        unknown = set(compression.ranks) - {k.rsplit(".", 1)[0] for k in shapes}
        if unknown:
            raise FlexmoeError(f"compression names unknown matrices ({sorted(unknown)[0][:60]})")
    return shapes


def materialise(tensors: dict[str, torch.Tensor], anchor_model) -> dict[str, torch.Tensor]:
    """A compressed package's tensors → the ordinary ones: each FFN matrix = anchor's + U·V."""
    out = {k: v for k, v in tensors.items() if not k.endswith((".u", ".v"))}
    for i, layer in enumerate(anchor_model.model.layers):
        for proj in FFN:
            name = f"layers.{i}.{proj}"
            base = getattr(layer.mlp, proj).weight.detach().float().cpu()
            out[name] = base + tensors[f"{name}.u"] @ tensors[f"{name}.v"]
    return out


def write_package(out: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> Manifest:
    """Write a package atomically; fills in the tensor table from the tensors themselves."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    manifest = {
        **manifest,
        "tensors": {
            k: {"shape": list(v.shape), "dtype": "float32", "sha256": tensor_sha256(v)}
            for k, v in tensors.items()
        },
    }
    m = Manifest.model_validate(manifest)
    with atomic_dir(out, overwrite=True) as tmp:
        save_file(tensors, tmp / WEIGHTS)
        write_json(tmp / MANIFEST, json.loads(m.model_dump_json()))
        (tmp / CARD).write_text(package_card(json.loads(m.model_dump_json())))
    return m


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(root)"
    if err["type"] == "missing":
        return f"field '{loc}' is missing"
    return f"field '{loc}': {err['msg']}"


def read_manifest(pkg: Path) -> Manifest:
    pkg = Path(pkg)
    if not pkg.is_dir():
        raise FlexmoeError(f"expert package not found: {pkg}")
    raw = read_json(pkg / MANIFEST, f"{pkg}: {MANIFEST}", MAX_MANIFEST_BYTES)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise FlexmoeError(f"{pkg / MANIFEST}: {_first_error(e)}") from None


def expected_bytes(shapes: dict[str, list[int]]) -> int:
    """The float32 data bytes of a package with these tensor shapes."""
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += 4 * n
    return total


def _read_header(path: Path) -> dict:
    """The safetensors header, read with bounded size before any tensor is touched."""
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FlexmoeError(f"{path}: not a valid safetensors file (truncated)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise FlexmoeError(
                f"{path}: not a valid safetensors file (header of {n:,} bytes is too large)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FlexmoeError(f"{path}: not a valid safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise FlexmoeError(f"{path}: not a valid safetensors file (bad header)")
    return header


def load_tensors(pkg: Path, shapes: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Read expert.safetensors without ever unpickling; a non-safetensors file is refused.
    With `shapes` (the tensors the anchor allows), the file's size and its header's tensor table
    are checked against them before any tensor is read, so memory stays bounded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    pkg = Path(pkg)
    limit = 1 << 40 if shapes is None else expected_bytes(shapes) + MAX_HEADER_BYTES + 8
    path = regular_file(pkg / WEIGHTS, f"{pkg}: {WEIGHTS}", limit)
    if shapes is not None:
        for name, info in _read_header(path).items():
            if name == "__metadata__":
                continue
            if name not in shapes:
                raise FlexmoeError(f"{pkg}: unexpected tensor '{name[:80]}'")
            if not isinstance(info, dict) or info.get("dtype") != "F32":
                raise FlexmoeError(f"{pkg}: tensor '{name}' is not float32")
            if info.get("shape") != shapes[name]:
                raise FlexmoeError(
                    f"{pkg}: tensor '{name}' has shape {str(info.get('shape'))[:40]}, "
                    f"expected {shapes[name]}"
                )
    try:
        # copies, not mmap views: the file may be replaced while the tensors are in use
        return {k: v.clone() for k, v in load_file(path).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FlexmoeError(
            f"{path}: not a valid safetensors file ({str(e).splitlines()[0][:120]})"
        ) from None


def anchor_scales(anchor_model) -> dict[str, float]:
    """max |w| of each FFN matrix of the anchor, keyed like package tensors (the scale rule)."""
    out = {}
    for i, layer in enumerate(anchor_model.model.layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(layer.mlp, proj).weight
            out[f"layers.{i}.{proj}"] = float(w.detach().abs().max())
    return out


def check_scale(pkg: Path, name: str, t: torch.Tensor, scales: dict[str, float] | None) -> None:
    """The scale rule (module docstring)."""
    top = float(t.abs().max()) if t.numel() else 0.0
    if name.endswith((".gate_proj", ".up_proj", ".down_proj")):
        if scales is not None and name in scales and top > MAX_FFN_SCALE * scales[name]:
            raise FlexmoeError(
                f"{pkg}: tensor '{name}' has max |w| {top:.3g}, over {MAX_FFN_SCALE:g}× the "
                f"anchor's {scales[name]:.3g}"
            )
    elif name.endswith(".router") and top > MAX_ROUTER_ABS:
        raise FlexmoeError(f"{pkg}: router row '{name}' has max |r| {top:.3g} > {MAX_ROUTER_ABS:g}")
    elif name.endswith(".bias") and not -MAX_BIAS_ABS <= float(t) <= 0:
        raise FlexmoeError(
            f"{pkg}: tensor '{name}' is {float(t):g} (bias must be ≤ 0 and ≥ −{MAX_BIAS_ABS:g})"
        )
    elif name in STATISTICS and float(t.norm(dim=-1).max()) > 1.0 + 1e-4:
        raise FlexmoeError(f"{pkg}: {name} has norm {float(t.norm(dim=-1).max()):.3g} > 1")


def verify_package(
    pkg: Path, anchor_record: dict, anchor_extras: dict[str, torch.Tensor], anchor
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Schema, tensor set, shapes, dtypes, hashes, finite values, the scale rule, bias ≤ 0, the
    anchor fingerprint and public router row. `anchor`: the anchor model (or only its config,
    which skips the FFN part of the scale rule). Any failure raises FlexmoeError naming it;
    nothing is returned half-checked.
    """
    pkg = Path(pkg)
    config = getattr(anchor, "config", anchor)
    scales = anchor_scales(anchor) if hasattr(anchor, "model") else None
    m = read_manifest(pkg)
    if m.anchor_fingerprint != anchor_record["fingerprint"]:
        raise FlexmoeError(
            f"{pkg}: built on anchor {m.anchor_fingerprint[:12]}…, not this anchor "
            f"{anchor_record['fingerprint'][:12]}…"
        )
    public = anchor_extras.get(f"public.{m.router_init}")
    if public is None or tensor_sha256(public) != m.public_router_sha256:
        raise FlexmoeError(f"{pkg}: public router rows ({m.router_init}) differ from the anchor's")
    check_architecture(m, config)
    if m.compression is not None and scales is None:
        raise FlexmoeError(f"{pkg}: a compressed package is checked with the anchor's weights")
    try:
        stored = expected_shapes(m.architecture, m.compression)
    except FlexmoeError as e:
        raise FlexmoeError(f"{pkg}: {e}") from None
    optional = optional_shapes(m.architecture.hidden_size)
    allowed = stored | optional
    tensors = load_tensors(pkg, allowed)
    want = stored | {k: v for k, v in optional.items() if k in tensors or k in m.tensors}
    for name in sorted(set(want) | set(m.tensors) | set(tensors)):
        if name not in want:
            raise FlexmoeError(f"{pkg}: unexpected tensor '{name[:80]}'")
        if name not in m.tensors:
            raise FlexmoeError(f"{pkg}: manifest lists no tensor '{name}'")
        if name not in tensors:
            raise FlexmoeError(f"{pkg}: tensor '{name}' is missing from {WEIGHTS}")
        t, info = tensors[name], m.tensors[name]
        if list(t.shape) != want[name] or info.shape != want[name]:
            raise FlexmoeError(
                f"{pkg}: tensor '{name}' has shape {list(t.shape)}, expected {want[name]}"
            )
        if t.dtype != torch.float32:
            raise FlexmoeError(f"{pkg}: tensor '{name}' has dtype {t.dtype}, expected float32")
        if tensor_sha256(t) != info.sha256:
            raise FlexmoeError(f"{pkg}: tensor '{name}' does not match its sha256 (tampered?)")
        if not torch.isfinite(t).all():
            raise FlexmoeError(f"{pkg}: tensor '{name}' has non-finite values")
        check_scale(pkg, name, t, scales)
    if m.compression is not None:
        tensors = materialise(tensors, anchor)
        for name in expected_shapes(m.architecture):
            if name.endswith(FFN):
                if not torch.isfinite(tensors[name]).all():
                    raise FlexmoeError(f"{pkg}: tensor '{name}' has non-finite values")
                check_scale(pkg, name, tensors[name], scales)
    dp_record(m)
    return m, tensors


def dp_record(m: Manifest) -> dict | None:
    """The manifest's DP-SGD record (dp.py), None if trained without DP; malformed → error."""
    rec = (m.training.model_extra or {}).get("dp")
    if rec is None:
        return None
    eps = rec.get("epsilon") if isinstance(rec, dict) else None
    delta = rec.get("delta") if isinstance(rec, dict) else None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (eps, delta)):
        raise FlexmoeError(f"expert '{m.name}': training.dp needs numeric epsilon and delta")
    if not (0 < eps <= 1e6 and 0 < delta < 1):
        raise FlexmoeError(f"expert '{m.name}': training.dp has an invalid epsilon or delta")
    for k in ("noise_multiplier", "max_grad_norm", "sampling_rate", "steps"):
        v = rec.get(k)
        if v is not None and not (isinstance(v, int | float) and abs(float(v)) < 1e12):
            raise FlexmoeError(f"expert '{m.name}': training.dp.{k} is not a number")
    for k in ("accountant", "privacy_unit"):
        if not isinstance(rec.get(k, ""), str) or len(rec.get(k, "")) > 200:
            raise FlexmoeError(f"expert '{m.name}': training.dp.{k} is not a short string")
    return rec


def check_architecture(m: Manifest, config) -> None:
    """The package's shapes must be the anchor's."""

    a = m.architecture
    got = (a.model_type, a.hidden_size, a.intermediate_size, a.num_hidden_layers)
    want = (
        family_of(config.model_type).moe_type,
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
    )
    if got != want:
        raise FlexmoeError(f"expert '{m.name}': architecture {got} does not match anchor {want}")


def validate_name(name: str) -> str:
    if not re.fullmatch(NAME_RE, name):
        raise FlexmoeError(
            f"invalid expert name {name[:70]!r} (1-64 of lowercase letters, digits, - and _, "
            "starting with a letter or digit)"
        )
    if name in RESERVED_NAMES:
        raise FlexmoeError(f"the expert name '{name}' is reserved for the anchor's expert")
    return name
