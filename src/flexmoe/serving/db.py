"""The serving state database: tenants, revocations, usage counters, the ledger and its checkpoints.

Several `flexmoe serve` processes (or hosts) share one database, so a revocation made through any
of them applies to the next request on all, limits hold across replicas and the ledger is one
chain. SQLite is the default (embedded, WAL, `STATE/flexmoe.db`, nothing to install);
`--db postgresql://…` uses PostgreSQL (psycopg 3). One data layer, SQLAlchemy Core, for both.

The schema is versioned (`meta.schema_version`, `MIGRATIONS`): a database is brought to this
flexmoe's version under a lock, and one written by a newer flexmoe is refused. Every write is
one short transaction: SQLite transactions begin IMMEDIATE (the write lock up front, so two
processes never deadlock on an upgrade), PostgreSQL appends to the ledger under the row lock of
`ledger_head`, so rows are chained in one order whichever replica writes them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from flexmoe.errors import FlexmoeError
from flexmoe.serving.ledger import (
    GENESIS,
    Checkpoint,
    Verified,
    canonical,
    checkpoint_payload,
    iter_ledger_jsonl,
    row_hash,
    verify_chain,
)
from flexmoe.store.fsutil import regular_file

SCHEMA_VERSION = 1
DB_FILE = "flexmoe.db"

md = sa.MetaData()
meta = sa.Table(
    "meta", md, sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text)
)
tenants = sa.Table(
    "tenants",
    md,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("experts", sa.Text, nullable=False),  # JSON list, or null for every expert
    sa.Column("uses", sa.Text, nullable=False),  # JSON list
    sa.Column("requests_per_minute", sa.Integer),
    sa.Column("tokens_per_day", sa.BigInteger),
)
revocations = sa.Table(
    "revocations",
    md,
    sa.Column("expert", sa.String(256), primary_key=True),
    sa.Column("at", sa.String(40), nullable=False),
)
usage = sa.Table(  # counters for the per-tenant limits: one row per tenant, kind and window
    "usage",
    md,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),  # requests | tokens
    sa.Column("period", sa.String(32), primary_key=True),  # the minute or the UTC day
    sa.Column("n", sa.BigInteger, nullable=False),
)
ledger = sa.Table(
    "ledger",
    md,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("record", sa.Text, nullable=False),
    sa.Column("prev", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)
ledger_head = sa.Table(  # one row: the last seq and hash (its row lock orders appends)
    "ledger_head",
    md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)
checkpoints = sa.Table(
    "checkpoints",
    md,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("time", sa.String(40), nullable=False),
    sa.Column("key_id", sa.String(16), nullable=False),
    sa.Column("public_key", sa.String(64), nullable=False),
    sa.Column("signature", sa.String(100), nullable=False),
)


def _v1(conn: sa.Connection) -> None:
    for t in (tenants, revocations, usage, ledger, ledger_head, checkpoints):
        t.create(conn)
    conn.execute(ledger_head.insert().values(id=1, seq=0, hash=GENESIS))
    conn.execute(meta.insert().values(key="admin_key_sha256", value=None))


MIGRATIONS = {1: _v1}  # version → step from the version before; append, never edit


def database_url(db: str | None, state: Path) -> sa.URL:
    """`--db` as a SQLAlchemy URL: a postgresql:// URL, a sqlite:/// URL or a file path;
    None = `STATE/flexmoe.db`. Anything else is refused (the password is never printed)."""
    if db is None:
        return sa.URL.create("sqlite", database=str(Path(state) / DB_FILE))
    if "://" not in db:
        return sa.URL.create("sqlite", database=str(Path(db)))
    try:
        url = sa.make_url(db)
    except (sa.exc.ArgumentError, ValueError):
        raise FlexmoeError("--db: not a database URL (postgresql://… or a SQLite file)") from None
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return url.set(drivername="postgresql+psycopg")
    if url.drivername == "sqlite" and url.database:
        return url
    raise FlexmoeError(f"--db: unsupported database {url.drivername!r} (postgresql or sqlite)")


def shown(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


@dataclass(frozen=True)
class TenantRow:
    name: str
    key_sha256: str
    experts: list[str] | None  # None = every expert
    uses: list[str]
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class StateDB:
    """One process's handle on the shared state. Thread-safe (a connection pool)."""

    def __init__(self, url: sa.URL, create: bool = True):
        """`create=False` (reading a ledger to verify it): a database that does not exist, or
        holds another schema version, is refused rather than created or upgraded."""
        self.url = url
        self.sqlite = url.get_backend_name() == "sqlite"
        if self.sqlite and not create:
            regular_file(Path(url.database), "state database", 1 << 44)
        if self.sqlite:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(url, connect_args={"timeout": 30})
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        self._insert = sqlite.insert if self.sqlite else postgresql.insert
        self.lock = threading.Lock()  # one append at a time from this process
        try:
            self._migrate() if create else self._check_version()
        except sa.exc.SQLAlchemyError as e:
            raise FlexmoeError(f"state database {shown(url)}: {_reason(e)}") from None

    def close(self) -> None:
        self.engine.dispose()

    # -- schema
    def _check_version(self) -> None:
        with self.engine.begin() as conn:
            have = conn.execute(
                sa.select(meta.c.value).where(meta.c.key == "schema_version")
            ).scalar()
        if have != str(SCHEMA_VERSION):
            raise FlexmoeError(
                f"state database {shown(self.url)}: schema version {have} "
                f"(this flexmoe reads {SCHEMA_VERSION})"
            )

    def _migrate(self) -> None:
        with self.engine.begin() as conn:
            if not self.sqlite:  # one migrating process at a time (SQLite: BEGIN IMMEDIATE)
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7318850273)"))
            meta.create(conn, checkfirst=True)
            row = conn.execute(
                sa.select(meta.c.value).where(meta.c.key == "schema_version")
            ).scalar()
            have = int(row) if row is not None else 0
            if have > SCHEMA_VERSION:
                raise FlexmoeError(
                    f"state database {shown(self.url)}: schema version {have} was written by a "
                    f"newer flexmoe (this one knows {SCHEMA_VERSION})"
                )
            for v in range(have + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[v](conn)
            if have < SCHEMA_VERSION:
                values = {"key": "schema_version", "value": str(SCHEMA_VERSION)}
                stmt = self._insert(meta).values(**values)
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["key"], set_={"value": values["value"]}
                    )
                )

    # -- tenants and keys
    def replace_tenants(self, rows: list[TenantRow], admin_key_sha256: str | None) -> None:
        """The keys file becomes the tenant set, in one transaction (no moment without keys)."""
        with self.engine.begin() as conn:
            if not self.sqlite:  # two replicas importing at once: one after the other
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7318850274)"))
            conn.execute(tenants.delete())
            for t in rows:
                conn.execute(
                    tenants.insert().values(
                        name=t.name,
                        key_sha256=t.key_sha256,
                        experts=json.dumps(t.experts),
                        uses=json.dumps(t.uses),
                        requests_per_minute=t.requests_per_minute,
                        tokens_per_day=t.tokens_per_day,
                    )
                )
            conn.execute(
                meta.update().where(meta.c.key == "admin_key_sha256").values(value=admin_key_sha256)
            )

    def tenant_count(self) -> int:
        with self.engine.begin() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(tenants)).scalar())

    def all_tenants(self) -> list[TenantRow]:
        with self.engine.begin() as conn:
            return [_tenant(r) for r in conn.execute(sa.select(tenants)).mappings()]

    def tenant_by_hash(self, key_sha256: str) -> TenantRow | None:
        with self.engine.begin() as conn:
            r = conn.execute(
                sa.select(tenants).where(tenants.c.key_sha256 == key_sha256)
            ).mappings()
            row = r.first()
        return _tenant(row) if row is not None else None

    def admin_hash(self) -> str | None:
        with self.engine.begin() as conn:
            return conn.execute(
                sa.select(meta.c.value).where(meta.c.key == "admin_key_sha256")
            ).scalar()

    # -- revocations
    def revoked(self) -> dict[str, str]:
        with self.engine.begin() as conn:
            return dict(conn.execute(sa.select(revocations.c.expert, revocations.c.at)).all())

    def revoke(self, expert: str, at: str) -> str:
        """Record a revocation (the first time wins); returns its time."""
        with self.engine.begin() as conn:
            conn.execute(
                self._insert(revocations).values(expert=expert, at=at).on_conflict_do_nothing()
            )
            return conn.execute(
                sa.select(revocations.c.at).where(revocations.c.expert == expert)
            ).scalar_one()

    # -- per-tenant limits
    def count_request(self, tenant: str, now: dt.datetime | None = None) -> int:
        """Add one request to the tenant's current minute; returns the minute's count."""
        now = now or _now()
        return self._bump(tenant, "requests", now.strftime("%Y-%m-%dT%H:%M"), 1)

    def tokens_today(self, tenant: str, now: dt.datetime | None = None) -> int:
        now = now or _now()
        with self.engine.begin() as conn:
            n = conn.execute(
                sa.select(usage.c.n).where(
                    usage.c.tenant == tenant,
                    usage.c.kind == "tokens",
                    usage.c.period == now.strftime("%Y-%m-%d"),
                )
            ).scalar()
        return int(n or 0)

    def _bump(self, tenant: str, kind: str, window: str, by: int, conn=None) -> int:
        stmt = self._insert(usage).values(tenant=tenant, kind=kind, period=window, n=by)
        stmt = stmt.on_conflict_do_update(
            index_elements=["tenant", "kind", "period"], set_={"n": usage.c.n + by}
        ).returning(usage.c.n)
        if conn is not None:
            return int(conn.execute(stmt).scalar_one())
        with self.engine.begin() as c:
            return int(c.execute(stmt).scalar_one())

    # -- the ledger
    def append(self, record: dict, tokens: int, signer=None, every: int = 0) -> tuple[int, str]:
        """Append one request's record to the chain, count its tokens toward the tenant's day
        and, every `every` rows, sign a checkpoint, in one transaction: committed before the
        response is sent. Returns (seq, hash)."""
        with self.lock, self.engine.begin() as conn:
            # taking the head row's lock first orders appends across processes
            seq, prev = conn.execute(
                ledger_head.update()
                .where(ledger_head.c.id == 1)
                .values(seq=ledger_head.c.seq + 1)
                .returning(ledger_head.c.seq, ledger_head.c.hash)
            ).one()
            text = canonical({**record, "seq": seq})
            h = row_hash(prev, text)
            conn.execute(
                ledger.insert().values(
                    seq=seq,
                    tenant=record["tenant"],
                    request_id=record["request_id"],
                    record=text,
                    prev=prev,
                    hash=h,
                )
            )
            conn.execute(ledger_head.update().where(ledger_head.c.id == 1).values(hash=h))
            if tokens:
                self._bump(record["tenant"], "tokens", record["time"][:10], tokens, conn)
            if signer is not None and every > 0 and seq % every == 0:
                self._sign(conn, signer, seq, h)
        return seq, h

    def checkpoint(self, signer) -> Checkpoint | None:
        """Sign the chain's head unless a checkpoint already covers it."""
        with self.engine.begin() as conn:
            seq, h = conn.execute(sa.select(ledger_head.c.seq, ledger_head.c.hash)).one()
            last = conn.execute(sa.select(sa.func.max(checkpoints.c.seq))).scalar() or 0
            if seq == 0 or last >= seq:
                return None
            return self._sign(conn, signer, seq, h)

    def _sign(self, conn, signer, seq: int, h: str) -> Checkpoint:
        from cryptography.hazmat.primitives import serialization

        from flexmoe.store.signing import key_id

        time = _now().isoformat(timespec="milliseconds")
        raw = signer.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        cp = Checkpoint(
            seq,
            h,
            time,
            key_id(raw),
            base64.b64encode(raw).decode(),
            base64.b64encode(signer.sign(checkpoint_payload(seq, h, time))).decode(),
        )
        conn.execute(self._insert(checkpoints).values(**cp.as_dict()).on_conflict_do_nothing())
        return cp

    def latest_checkpoint(self) -> Checkpoint | None:
        with self.engine.begin() as conn:
            r = conn.execute(
                sa.select(checkpoints).order_by(checkpoints.c.seq.desc()).limit(1)
            ).mappings()
            row = r.first()
        return Checkpoint(**row) if row is not None else None

    def all_checkpoints(self) -> list[Checkpoint]:
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(checkpoints).order_by(checkpoints.c.seq)).mappings()
            return [Checkpoint(**r) for r in rows]

    def rows(self, batch: int = 1000) -> Iterator[tuple[int, str, str, str]]:
        """(seq, record, prev, hash) in seq order, read in batches (bounded memory)."""
        after = -1
        while True:
            with self.engine.begin() as conn:
                got = conn.execute(
                    sa.select(ledger.c.seq, ledger.c.record, ledger.c.prev, ledger.c.hash)
                    .where(ledger.c.seq > after)
                    .order_by(ledger.c.seq)
                    .limit(batch)
                ).all()
            if not got:
                return
            yield from (tuple(r) for r in got)
            after = got[-1][0]

    def verify(self, trusted: dict[str, str] | None, pinned: Checkpoint | None = None) -> Verified:
        """The whole chain and its checkpoints checked (`ledger.verify_chain`)."""
        return verify_chain(self.rows(), self.all_checkpoints(), trusted, pinned)

    def import_jsonl(self, path: Path) -> int:
        """Append the records of a JSONL ledger (flexmoe before the database) to the chain;
        every line is checked before the first is written. Returns the rows added."""
        records = [rec for _, rec in iter_ledger_jsonl(path)]
        for i, rec in enumerate(records, 1):
            rec = {k: v for k, v in rec.items() if k != "seq"}
            rec.setdefault("time", "")
            rec["request_id"] = f"imported:{Path(path).name[:40]}:{i}"
            self.append(rec, 0)
        return len(records)

    def request_ids(self) -> set[str]:
        with self.engine.begin() as conn:
            return set(conn.execute(sa.select(ledger.c.request_id)).scalars())


def _tenant(r) -> TenantRow:
    return TenantRow(
        r["name"],
        r["key_sha256"],
        json.loads(r["experts"]),
        json.loads(r["uses"]),
        r["requests_per_minute"],
        r["tokens_per_day"],
    )


def _sqlite_connect(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # SQLAlchemy's `begin` event issues BEGIN itself
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    # switching to WAL needs an exclusive lock and SQLite may refuse it at once, without the busy
    # handler, while another replica opens the same file: retry for as long as busy_timeout
    deadline = time.monotonic() + 30
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    cur.execute("PRAGMA synchronous=FULL")  # a committed ledger row survives a power cut
    cur.close()


def _sqlite_begin(conn) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _reason(e: Exception) -> str:
    orig = getattr(e, "orig", None)
    text = str(orig if orig is not None else e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
