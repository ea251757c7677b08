"""The usage ledger's rules: what a record holds, how rows are chained and how a chain is verified.

The ledger is the basis for crediting data owners, so an owner must be able to check it rather
than take the operator's word. Every finished request is one row whose canonical JSON `record`
names the tenant, the experts that were active, their owners, the token counts and the share of
routing weight each expert carried for the generated tokens. Row n stores
`hash_n = sha256(DOMAIN || hash_{n-1} || "\\n" || record_n)`, so editing, inserting or deleting
a row breaks every later hash; the operator signs checkpoints `(seq, hash, time)` with an Ed25519
key, so rewriting the whole chain after an edit breaks the signatures. Cutting rows off the end
is caught by a checkpoint that covers them, and by any checkpoint an owner saved earlier
(`GET /ledger/checkpoint`, `flexmoe ledger verify --checkpoint`).

The rows live in the state database (`serving.db`); this module holds the rules only, on plain
values, so `verify_chain` can be read in one sitting. `summarize_ledger` reads the JSONL ledgers
that flexmoe wrote before the database (importable with `flexmoe ledger import`).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import lzma
import math
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flexmoe.data.shards import iter_jsonl
from flexmoe.errors import FlexmoeError
from flexmoe.store.fsutil import regular_file

MAX_LEDGER_BYTES = 1 << 34  # read line by line: the bound is on time, not memory
MAX_LEDGER_EXPERTS = 4096
MAX_RECORD_BYTES = 1 << 20
GENESIS = "0" * 64  # the hash before the first row
DOMAIN = b"flexmoe-ledger-row-v1\n"
CHECKPOINT_DOMAIN = b"flexmoe-ledger-checkpoint-v1\n"


def canonical(rec: dict) -> str:
    """The one text a record is hashed as: sorted keys, no spaces, finite numbers only."""
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), allow_nan=False)


def row_hash(prev: str, record: str) -> str:
    return hashlib.sha256(DOMAIN + prev.encode() + b"\n" + record.encode()).hexdigest()


def checkpoint_payload(seq: int, hash_: str, time: str) -> bytes:
    """The exact bytes the operator signs for a checkpoint."""
    return CHECKPOINT_DOMAIN + f"{seq}\n{hash_}\n{time}".encode()


def check_record(where: str, rec: object) -> tuple[str, int, dict[str, float]]:
    """A record as (tenant, completion tokens, attribution); anything else is refused:
    a total built from a record it cannot read would credit owners wrongly."""
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


@dataclass
class Totals:
    """Routed tokens (generated tokens × routing share) per tenant → expert, and per owner."""

    by_tenant: dict[str, dict[str, float]] = field(default_factory=dict)
    by_owner: dict[str, float] = field(default_factory=dict)
    rows: int = 0

    def add(self, where: str, rec: object) -> None:
        tenant, n, attr = check_record(where, rec)
        owners = rec.get("owners") or {}  # type: ignore[union-attr]
        if not isinstance(owners, dict):
            raise FlexmoeError(f"{where}: 'owners' must be an object of expert → owner")
        per = self.by_tenant.setdefault(tenant, {})
        for expert, share in attr.items():
            per[expert] = per.get(expert, 0.0) + n * float(share)
            owner = owners.get(expert)
            owner = owner if isinstance(owner, str) else f"(expert {expert})"
            self.by_owner[owner] = self.by_owner.get(owner, 0.0) + n * float(share)
        self.rows += 1


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    time: str
    key_id: str
    public_key: str  # base64 of the raw 32-byte Ed25519 key
    signature: str  # base64

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Verified:
    totals: Totals
    head_seq: int
    head_hash: str
    checkpoints: int
    signed_upto: int  # the last row a valid checkpoint covers (0: none)


def _signature_ok(cp: Checkpoint, trusted: dict[str, str]) -> bool:
    if trusted.get(cp.key_id) != cp.public_key:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(cp.public_key, validate=True))
        key.verify(
            base64.b64decode(cp.signature, validate=True),
            checkpoint_payload(cp.seq, cp.hash, cp.time),
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_chain(
    rows: Iterable[tuple[int, str, str, str]],
    checkpoints: Iterable[Checkpoint],
    trusted: dict[str, str] | None,
    pinned: Checkpoint | None = None,
) -> Verified:
    """Check rows `(seq, record, prev, hash)` in seq order and the checkpoints over them.

    Refused (FlexmoeError naming the first bad row or checkpoint): a gap or repeat in seq, a
    `prev` that is not the previous row's hash, a hash that does not match its record, a record
    that is not a valid ledger record or names another seq; with `trusted` keys (key id →
    base64), a checkpoint signed by another key, a bad signature, or one whose hash is not the
    chain's at its seq (rows edited after signing, or cut off the end). `pinned` is a checkpoint
    an owner saved earlier: the chain must still contain it."""
    totals, prev, seq = Totals(), GENESIS, 0
    at: dict[int, str] = {}
    cps = list(checkpoints)
    wanted = {cp.seq for cp in cps} | ({pinned.seq} if pinned else set())
    for n, record, stored_prev, stored_hash in rows:
        where = f"ledger row {n}"
        if n != seq + 1:
            raise FlexmoeError(f"{where}: expected row {seq + 1} (a row is missing or repeated)")
        if stored_prev != prev:
            raise FlexmoeError(f"{where}: does not follow row {seq} (chain broken)")
        if len(record) > MAX_RECORD_BYTES or row_hash(prev, record) != stored_hash:
            raise FlexmoeError(f"{where}: hash does not match its record (edited?)")
        try:
            rec = json.loads(record)
        except (json.JSONDecodeError, RecursionError):
            raise FlexmoeError(f"{where}: record is not valid JSON") from None
        if not isinstance(rec, dict) or rec.get("seq") != n:
            raise FlexmoeError(f"{where}: record names another row")
        totals.add(where, rec)
        prev, seq = stored_hash, n
        if n in wanted:
            at[n] = stored_hash
    signed = 0
    for cp in [*cps, *([pinned] if pinned else [])]:
        where = f"checkpoint at row {cp.seq}"
        if trusted is not None and not _signature_ok(cp, trusted):
            raise FlexmoeError(f"{where}: not signed by a trusted key (key {cp.key_id[:16]})")
        if at.get(cp.seq) != cp.hash:
            what = "beyond the end of the ledger (rows cut off?)" if cp.seq > seq else "edited?"
            raise FlexmoeError(f"{where}: the ledger does not match it ({what})")
        signed = max(signed, cp.seq)
    return Verified(totals, seq, prev, len(cps), signed)


def parse_checkpoint(raw: object, where: str) -> Checkpoint:
    """A checkpoint from JSON (an owner's saved copy): strict fields, bounded strings."""
    fields = ("seq", "hash", "time", "key_id", "public_key", "signature")
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise FlexmoeError(f"{where}: not a ledger checkpoint (fields {', '.join(fields)})")
    if type(raw["seq"]) is not int or raw["seq"] < 0:
        raise FlexmoeError(f"{where}: 'seq' must be a non-negative integer")
    for k in fields[1:]:
        if not isinstance(raw[k], str) or len(raw[k]) > 200:
            raise FlexmoeError(f"{where}: '{k}' must be a short string")
    return Checkpoint(**raw)


def summarize_ledger(path: Path) -> dict[str, dict[str, float]]:
    """{tenant: {expert: routed tokens}} from a JSONL ledger (flexmoe before the database).
    Any line that is not a valid record (or a file that cannot be read) is a one-line error
    naming it; nothing is skipped."""
    totals = Totals()
    for where, rec in iter_ledger_jsonl(path):
        totals.add(where, rec)
    return totals.by_tenant


def iter_ledger_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) of a JSONL ledger; every failure is a one-line FlexmoeError."""
    path = regular_file(path, "ledger", MAX_LEDGER_BYTES)
    try:
        for lineno, rec in iter_jsonl(path):
            where = f"{path}:{lineno}"
            check_record(where, rec)
            for k, v in rec.items():  # type: ignore[union-attr]
                if isinstance(v, float) and not math.isfinite(v):
                    raise FlexmoeError(f"{where}: '{k[:40]}' is not a finite number")
            yield where, rec  # type: ignore[misc]
    except RecursionError:
        raise FlexmoeError(f"{path}: a line is nested too deeply to be a ledger record") from None
    except UnicodeDecodeError:
        raise FlexmoeError(f"{path}: not UTF-8 text") from None
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, zlib.error) as e:
        raise FlexmoeError(f"{path}: corrupt compressed file ({type(e).__name__})") from None
    except OSError as e:
        raise FlexmoeError(f"{path}: cannot read ({e.strerror or e})") from None
