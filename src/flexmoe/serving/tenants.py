"""Who may call the server: API keys, tenants and the admin key, from a strictly validated file.

Kept apart from the HTTP code so the fail-closed rule is in one place: a keys file the server
accepts always requires a key for every request (a typo such as `[[tenant]]` is refused at
startup rather than leaving the server open). Keys are stored as sha256 hashes and compared in
constant time.
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
from flexmoe.store.fsutil import regular_file


@dataclass(frozen=True)
class Tenant:
    name: str
    experts: frozenset[str] | None  # None = every expert
    uses: frozenset[str]


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


class KeysFile(BaseModel):
    """The keys file: at least one tenant; anything unknown is refused (a typo such as
    `[[tenant]]` must never leave the server open)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    admin_key_sha256: str | None = Field(None, pattern=HEX64)
    tenants: list[TenantEntry] = Field(min_length=1, max_length=10_000)


class Keys:
    """The keys file (TOML): `admin_key_sha256 = "…"` and `[[tenants]]` tables with `name`,
    `key_sha256`, `experts` (names or ["*"]) and `uses`. Without a file every request is the
    anonymous tenant and the admin routes are closed. A file is validated strictly at startup:
    unknown tables or fields, no tenant, a malformed hash, a repeated name or key are refusals,
    so a keys file the server accepts always requires a key for every request."""

    def __init__(self, path: Path | None):
        self.path = path
        self.admin: str | None = None
        self.tenants: list[tuple[str, Tenant]] = []
        if path is None:
            return
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
        for t in parsed.tenants:
            self.tenants.append(
                (
                    t.key_sha256,
                    Tenant(
                        t.name,
                        None if "*" in t.experts else frozenset(t.experts),
                        frozenset(t.uses),
                    ),
                )
            )
        self.admin = parsed.admin_key_sha256

    @property
    def open(self) -> bool:
        return not self.tenants

    def check_experts(self, names: list[str]) -> None:
        """Refuse a tenant that names an expert the model does not have (a typo)."""
        for _, t in self.tenants:
            unknown = sorted((t.experts or set()) - set(names))
            if unknown:
                raise FlexmoeError(
                    f"keys file {self.path}: tenant {t.name!r} names unknown expert(s) "
                    f"{', '.join(map(repr, unknown))[:200]} (the model has {', '.join(names)})"
                )

    def tenant(self, key: str | None) -> Tenant | None:
        if self.open:
            return OPEN
        if not key:
            return None
        h = key_hash(key)
        found = None
        for stored, tenant in self.tenants:  # constant time per entry, every entry compared
            if hmac.compare_digest(stored, h):
                found = tenant
        return found

    def is_admin(self, key: str | None) -> bool:
        return bool(self.admin and key and hmac.compare_digest(self.admin, key_hash(key)))
