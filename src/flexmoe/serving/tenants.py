"""Who may call the server: API keys, tenants, their limits and the admin key.

Tenants live in the state database (`serving.db`), shared by every replica; a keys file (TOML)
given to `flexmoe serve --keys` is validated strictly and then becomes the tenant set. Kept apart
from the HTTP code so the fail-closed rule is in one place: while the database holds any tenant,
every request needs a key (a keys file with a typo such as `[[tenant]]` is refused at startup
rather than leaving the server open; a database that cannot be read is an error, never "no
tenants"). Keys are stored as sha256 hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flexmoe.errors import FlexmoeError
from flexmoe.serving.db import StateDB, TenantRow
from flexmoe.store.fsutil import regular_file


@dataclass(frozen=True)
class Tenant:
    name: str
    experts: frozenset[str] | None  # None = every expert
    uses: frozenset[str]
    requests_per_minute: int | None = None  # None: no limit
    tokens_per_day: int | None = None  # prompt + completion tokens per UTC day


OPEN = Tenant("anonymous", None, frozenset({"research", "commercial"}))


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


HEX64 = r"^[0-9a-f]{64}$"


class TenantEntry(BaseModel):
    """One `[[tenants]]` table of the keys file."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    key_sha256: str = Field(pattern=HEX64)
    experts: list[str] = Field(["*"], max_length=256)
    uses: list[Literal["research", "commercial"]] = Field(["research", "commercial"], min_length=1)
    requests_per_minute: int | None = Field(None, ge=1, le=10**6)
    tokens_per_day: int | None = Field(None, ge=1, le=10**12)


class KeysFile(BaseModel):
    """The keys file: at least one tenant; anything unknown is refused (a typo such as
    `[[tenant]]` must never leave the server open)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    admin_key_sha256: str | None = Field(None, pattern=HEX64)
    tenants: list[TenantEntry] = Field(min_length=1, max_length=10_000)


def read_keys_file(path: Path) -> tuple[list[TenantRow], str | None]:
    """(tenants, admin key hash) from a keys file, validated strictly: unknown tables or fields,
    no tenant, a malformed hash, a repeated name or key are one-line refusals."""
    try:
        raw = tomllib.loads(regular_file(path, "keys file", 1 << 20).read_text())
        parsed = KeysFile.model_validate(raw)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FlexmoeError(f"keys file {path}: {type(e).__name__}: {e}") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "file"
        msg = "missing: the file must define at least one [[tenants]] table"
        if not (err["type"] == "missing" and loc == "tenants"):
            msg = err["msg"]
        raise FlexmoeError(f"keys file {path}: {loc}: {msg}") from None
    for what, values in (
        ("tenant name", [t.name for t in parsed.tenants]),
        ("key hash", [t.key_sha256 for t in parsed.tenants] + [parsed.admin_key_sha256]),
    ):
        given = [v for v in values if v is not None]
        if len(set(given)) != len(given):
            raise FlexmoeError(f"keys file {path}: a {what} is repeated")
    rows = [
        TenantRow(
            t.name,
            t.key_sha256,
            None if "*" in t.experts else list(t.experts),
            list(t.uses),
            t.requests_per_minute,
            t.tokens_per_day,
        )
        for t in parsed.tenants
    ]
    return rows, parsed.admin_key_sha256


def check_experts(rows: list[TenantRow], names: list[str], where: str) -> None:
    """Refuse a tenant that names an expert the model does not have (a typo)."""
    for t in rows:
        unknown = sorted(set(t.experts or ()) - set(names))
        if unknown:
            raise FlexmoeError(
                f"{where}: tenant {t.name!r} names unknown expert(s) "
                f"{', '.join(map(repr, unknown))[:200]} (the model has {', '.join(names)})"
            )


def _as_tenant(r: TenantRow) -> Tenant:
    experts = None if r.experts is None else frozenset(r.experts)
    return Tenant(r.name, experts, frozenset(r.uses), r.requests_per_minute, r.tokens_per_day)


class Keys:
    """The tenants and the admin key, read from the state database on every request (so a
    change made through any replica applies at once). `imported` (a keys file read by
    `read_keys_file`) replaces the stored tenants first. While the database holds no tenant,
    every request is the anonymous tenant and the admin routes are closed."""

    def __init__(
        self,
        db: StateDB,
        imported: tuple[list[TenantRow], str | None] | None = None,
        path: Path | None = None,
    ):
        self.db, self.path = db, path
        if imported is not None:
            db.replace_tenants(*imported)

    @property
    def open(self) -> bool:
        return self.db.tenant_count() == 0

    @property
    def tenants(self) -> list[Tenant]:
        return [_as_tenant(r) for r in self.db.all_tenants()]

    def tenant(self, key: str | None) -> Tenant | None:
        row = self.db.tenant_by_hash(key_hash(key)) if key else None
        if row is not None:
            return _as_tenant(row)
        return OPEN if self.open else None

    def is_admin(self, key: str | None) -> bool:
        admin = self.db.admin_hash() if key else None
        return bool(admin and key and hmac.compare_digest(admin, key_hash(key)))
