"""Consent revocations of a merged model's experts: the one place they are stored and read.

A revocation (`POST /admin/experts/{name}/revoke`) is written to `revoked.json` in the model's
state directory (default `MODEL.serve/`, beside the model). Every path that loads a merged model
reads it (`store.merged.load_merged`: generate, eval, tasks, audit, router tuning, serve), and
`merge` leaves out revoked experts of the output it replaces or the base it extends, so a revoked
expert is never used again anywhere, not only by the server that received the revocation. A corrupt
revocations file is a refusal, never an empty list: failing open would bring a revoked expert back.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from flexmoe.errors import FlexmoeError
from flexmoe.store.fsutil import read_json, write_json

REVOKED = "revoked.json"
MAX_REVOKED_BYTES = 1 << 20


def default_state_dir(model_dir: Path) -> Path:
    """MODEL.serve beside the (resolved) model directory."""
    real = Path(model_dir).resolve()
    return real.with_name(real.name + ".serve")


def state_dir(model_dir: Path, given: Path | None = None) -> Path:
    """The state directory to use: `given` or the default; a non-directory is refused."""
    path = Path(given) if given is not None else default_state_dir(model_dir)
    if path.exists() and not path.is_dir():
        raise FlexmoeError(f"state directory is not a directory: {path}")
    return path


def read_revoked(state: Path) -> dict[str, str]:
    """{expert name: revocation time (ISO 8601)}; {} when nothing was ever revoked."""
    p = Path(state) / REVOKED
    if not p.exists() and not p.is_symlink():
        return {}
    raw = read_json(p, "revocations file", MAX_REVOKED_BYTES)
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise FlexmoeError(f"revocations file {p}: must be a JSON object of name → time strings")
    return raw


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def revoke(
    state: Path, revoked: dict[str, str], name: str, at: str | None = None
) -> dict[str, str]:
    """`revoked` plus `name` (at `at`, default now), written atomically to the state directory."""
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    new = {**revoked, name: at or now()}
    write_json(state / REVOKED, new)
    return new


def reason(when: str) -> str:
    return f"consent revoked on {when}"
