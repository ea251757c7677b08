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
import zlib
from pathlib import Path

from flexmoe.data.shards import iter_jsonl
from flexmoe.errors import FlexmoeError
from flexmoe.store.fsutil import regular_file

MAX_LEDGER_BYTES = 1 << 34  # read line by line: the bound is on time, not memory


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


MAX_LEDGER_EXPERTS = 4096


def _check_line(where: str, rec: object) -> tuple[str, int, dict[str, float]]:
    """A ledger line as (tenant, completion tokens, attribution); anything else is refused:
    a total built from a line it cannot read would credit owners wrongly."""
    if not isinstance(rec, dict):
        raise FlexmoeError(f"{where}: not a ledger record (a JSON object)")
    tenant, n, attr = rec.get("tenant"), rec.get("completion_tokens"), rec.get("attribution")
    if not isinstance(tenant, str):
        raise FlexmoeError(f"{where}: 'tenant' must be a string")
    if type(n) is not int or n < 0:
        raise FlexmoeError(f"{where}: 'completion_tokens' must be a non-negative integer")
    if not isinstance(attr, dict) or len(attr) > MAX_LEDGER_EXPERTS:
        raise FlexmoeError(f"{where}: 'attribution' must be an object of expert shares")
    for expert, share in attr.items():
        if type(share) not in (int, float) or not (0.0 <= share <= 1.0):  # NaN fails too
            raise FlexmoeError(f"{where}: share of expert {expert[:40]!r} is not in [0, 1]")
    if sum(attr.values()) > 1.0 + 1e-6:
        raise FlexmoeError(f"{where}: expert shares sum to more than 1")
    return tenant, n, attr


def summarize_ledger(path: Path) -> dict[str, dict[str, float]]:
    """{tenant: {expert: routed tokens}}: generated tokens × routing share, per expert and
    tenant — the basis for crediting data owners. Any line that is not a valid record (or a
    file that cannot be read) is a one-line error naming it; nothing is skipped."""
    import gzip
    import lzma

    path = regular_file(path, "ledger", MAX_LEDGER_BYTES)
    out: dict[str, dict[str, float]] = {}
    try:
        for lineno, rec in iter_jsonl(path):
            tenant, n, attr = _check_line(f"{path}:{lineno}", rec)
            per = out.setdefault(tenant, {})
            for expert, share in attr.items():
                per[expert] = per.get(expert, 0.0) + n * float(share)
    except RecursionError:
        raise FlexmoeError(f"{path}: a line is nested too deeply to be a ledger record") from None
    except UnicodeDecodeError:
        raise FlexmoeError(f"{path}: not UTF-8 text") from None
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, zlib.error) as e:
        raise FlexmoeError(f"{path}: corrupt compressed file ({type(e).__name__})") from None
    except OSError as e:
        raise FlexmoeError(f"{path}: cannot read ({e.strerror or e})") from None
    return out
