"""Expert packages: the only thing a data owner ships. Weights and a manifest, never data.

A package is a directory with
- `expert.safetensors`: per layer i, `layers.{i}.gate_proj` (I,H), `layers.{i}.up_proj` (I,H),
  `layers.{i}.down_proj` (H,I), `layers.{i}.router` (H,) and `layers.{i}.bias` () ≤ 0;
  optionally `domain_embedding` (384,): the mean all-MiniLM-L6-v2 embedding of the owner's
  documents (a statistic of the owner's data, used for request-level preselection);
- `manifest.json`: who, what, under which consent, built on which anchor, how, and the sha256 of
  every tensor.
Packages are untrusted input: `verify_package` checks everything before any tensor is used.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flexmoe.errors import FlexmoeError
from flexmoe.fsutil import atomic_dir, write_json

MANIFEST = "manifest.json"
WEIGHTS = "expert.safetensors"
SCHEMA_VERSION = 1
NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,63}$"
USES = ("research", "commercial")
OPTIONAL_TENSORS = {"domain_embedding": [384]}


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
    model_type: Literal["flex_olmo"] = "flex_olmo"
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


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["flexmoe-expert-package"] = "flexmoe-expert-package"
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=NAME_RE)
    domain: str = Field(min_length=1)
    owner: str = Field(min_length=1)
    licence: str = Field(min_length=1)
    consent: Consent
    anchor_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    public_router_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    architecture: Architecture
    router_init: Literal["domain", "random", "hidden"]
    training: TrainingRecord
    tensors: dict[str, TensorInfo]
    created_with: dict[str, str] = {}


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(
        t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    ).hexdigest()


def expected_shapes(arch: Architecture) -> dict[str, list[int]]:
    h, i = arch.hidden_size, arch.intermediate_size
    shapes = {}
    for layer in range(arch.num_hidden_layers):
        p = f"layers.{layer}"
        shapes |= {
            f"{p}.gate_proj": [i, h],
            f"{p}.up_proj": [i, h],
            f"{p}.down_proj": [h, i],
            f"{p}.router": [h],
            f"{p}.bias": [],
        }
    return shapes


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
    return m


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(root)"
    if err["type"] == "missing":
        return f"field '{loc}' is missing"
    return f"field '{loc}': {err['msg']}"


def read_manifest(pkg: Path) -> Manifest:
    path = Path(pkg) / MANIFEST
    if not Path(pkg).is_dir():
        raise FlexmoeError(f"expert package not found: {pkg}")
    if not path.is_file():
        raise FlexmoeError(f"{pkg}: {MANIFEST} is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlexmoeError(f"{path}: not valid JSON ({e})") from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise FlexmoeError(f"{path}: {_first_error(e)}") from None


def load_tensors(pkg: Path) -> dict[str, torch.Tensor]:
    """Read expert.safetensors without ever unpickling; a non-safetensors file is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(pkg) / WEIGHTS
    if not path.is_file():
        raise FlexmoeError(f"{pkg}: {WEIGHTS} is missing")
    try:
        # copies, not mmap views: the file may be replaced while the tensors are in use
        return {k: v.clone() for k, v in load_file(path).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FlexmoeError(
            f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})"
        ) from None


def verify_package(
    pkg: Path, anchor_record: dict, anchor_extras: dict[str, torch.Tensor], anchor_config
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Schema, tensor set, shapes, dtypes, hashes, finite values, bias ≤ 0, anchor fingerprint and
    public router row. Any failure raises FlexmoeError naming it; nothing is returned half-checked.
    """
    pkg = Path(pkg)
    m = read_manifest(pkg)
    if m.anchor_fingerprint != anchor_record["fingerprint"]:
        raise FlexmoeError(
            f"{pkg}: built on anchor {m.anchor_fingerprint[:12]}…, not this anchor "
            f"{anchor_record['fingerprint'][:12]}…"
        )
    public = anchor_extras.get(f"public.{m.router_init}")
    if public is None or tensor_sha256(public) != m.public_router_sha256:
        raise FlexmoeError(f"{pkg}: public router rows ({m.router_init}) differ from the anchor's")
    check_architecture(m, anchor_config)
    tensors = load_tensors(pkg)
    want = expected_shapes(m.architecture) | {
        k: v for k, v in OPTIONAL_TENSORS.items() if k in tensors or k in m.tensors
    }
    for name in sorted(set(want) | set(m.tensors) | set(tensors)):
        if name not in want:
            raise FlexmoeError(f"{pkg}: unexpected tensor '{name}'")
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
        if name.endswith(".bias") and float(t) > 0:
            raise FlexmoeError(f"{pkg}: tensor '{name}' is {float(t):g} > 0 (bias must be ≤ 0)")
    return m, tensors


def check_architecture(m: Manifest, config) -> None:
    """The package's shapes must be the anchor's."""
    a = m.architecture
    got = (a.hidden_size, a.intermediate_size, a.num_hidden_layers)
    want = (config.hidden_size, config.intermediate_size, config.num_hidden_layers)
    if got != want:
        raise FlexmoeError(f"expert '{m.name}': architecture {got} does not match anchor {want}")


def validate_name(name: str) -> str:
    if not re.match(NAME_RE, name):
        raise FlexmoeError(f"invalid expert name '{name}' (lowercase letters, digits, - and _)")
    return name
