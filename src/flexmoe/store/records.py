"""Provenance: library versions and spec hashes recorded with every artefact flexmoe writes."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib.metadata import PackageNotFoundError, version


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("flexmoe", "torch", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def spec_hash(spec: dict) -> str:
    """Stable hash of everything that determines a run's output (for reuse decisions)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
