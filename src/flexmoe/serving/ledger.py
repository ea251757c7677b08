"""The usage ledger: one JSON line per finished request, the basis for crediting data owners.

Each record names the tenant, the experts that were active, the token counts and the share of
routing weight each expert carried for the generated tokens (an expert revoked mid-request is
credited only for what it made). Writes are serialised by a lock so concurrent requests never
interleave lines; `flexmoe ledger summarize` reads the file back with `summarize_ledger`.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

from flexmoe.data.shards import iter_jsonl


class Ledger:
    """Appends records to a JSONL file, one whole line at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()

    def record(
        self,
        tenant: str,
        active: list[str],
        prompt_tokens: int,
        completion_tokens: int,
        attribution: dict[str, float],
    ) -> None:
        rec = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "tenant": tenant,
            "active": active,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "attribution": attribution,
        }
        with self.lock, open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")


def summarize_ledger(path: Path) -> dict[str, dict[str, float]]:
    """{tenant: {expert: routed tokens}}: generated tokens × routing share, per expert and
    tenant — the basis for crediting data owners."""
    out: dict[str, dict[str, float]] = {}
    for _, rec in iter_jsonl(Path(path)):
        if not isinstance(rec, dict):
            continue
        per = out.setdefault(str(rec.get("tenant")), {})
        n = float(rec.get("completion_tokens") or 0)
        for expert, share in (rec.get("attribution") or {}).items():
            per[expert] = per.get(expert, 0.0) + n * float(share)
    return out
