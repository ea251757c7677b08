"""Package signatures: who vouches for an expert package.

`verify_package` proves a package is well formed, not who made it. An owner signs the package's
manifest (which holds every tensor's sha256, so the weights are bound too) with an Ed25519 key;
a model builder admits only packages signed by keys it trusts. Signatures are untrusted input:
every failure is a one-line FlexmoeError.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from flexmoe.errors import FlexmoeError
from flexmoe.store.fsutil import atomic_file, writable_file, write_json

SIGNATURE = "signature.json"
MANIFEST = "manifest.json"  # same name as flexmoe.package.MANIFEST (not imported: keeps torch out)
DOMAIN = b"flexmoe-expert-package-signature-v1\n"


@dataclass(frozen=True)
class Signer:
    key_id: str
    public_key: str  # base64 of the raw 32-byte Ed25519 public key


def _b64(s: str, size: int) -> bytes:
    """Strict, canonical base64 of exactly `size` bytes, else ValueError."""
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("not valid base64") from None
    if len(raw) != size or base64.b64encode(raw).decode() != s:
        raise ValueError(f"must be base64 of {size} bytes")
    return raw


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _read(path: Path, limit: int, what: str) -> bytes:
    """Read a regular file of at most `limit` bytes (no FIFOs, devices or huge files)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise FlexmoeError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FlexmoeError(f"{path}: {what} is not a regular file")
        data = b""
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
    except OSError as e:
        raise FlexmoeError(f"{path}: cannot read {what} ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FlexmoeError(f"{path}: {what} is larger than {limit} bytes")
    return data


class _SignatureFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    format: Literal["flexmoe-signature"]
    version: int = Field(ge=1, le=1)  # not Literal[1]: that would accept true and 1.0
    algorithm: Literal["ed25519"]
    public_key: str
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature: str

    @field_validator("public_key", "signature")
    @classmethod
    def _base64(cls, v: str, info: ValidationInfo) -> str:
        _b64(v, 32 if info.field_name == "public_key" else 64)
        return v

    @model_validator(mode="after")
    def _key_id(self) -> _SignatureFile:
        if self.key_id != key_id(_b64(self.public_key, 32)):
            raise ValueError("key_id does not belong to public_key")
        return self


def new_key(path: Path, overwrite: bool = False) -> str:
    """Write a fresh private key (PKCS8 PEM, 0600) and `<path>.pub`; return its key id."""
    path = writable_file(path, "key file")
    pub_path = writable_file(path.with_name(path.name + ".pub"), "public key file")
    for p in (path, pub_path):
        if not overwrite and (p.exists() or p.is_symlink()):
            raise FlexmoeError(f"{p} already exists (refusing to overwrite a key)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kid = key_id(raw)
    umask = os.umask(0o077)
    os.umask(umask)
    try:
        _write_key_files(path, pub_path, pem, f"ed25519 {base64.b64encode(raw).decode()} {kid}\n")
    except OSError as e:
        raise FlexmoeError(f"cannot write the key {path}: {e.strerror or e}") from None
    return kid


def _write_key_files(path: Path, pub_path: Path, pem: bytes, pub_line: str) -> None:
    umask = os.umask(0o077)
    os.umask(umask)
    # not fsutil.atomic_file: its temp file may be readable by others before we could chmod it
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp: 0600 from the start
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with atomic_file(pub_path, "w") as f:
        os.fchmod(f.fileno(), 0o644 & ~umask)
        f.write(pub_line)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read(Path(path), 16 * 1024, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise FlexmoeError(f"{path}: not an unencrypted Ed25519 private key (PKCS8 PEM)")
    return key


def _manifest_sha256(pkg: Path) -> str:
    if not Path(pkg).is_dir():
        raise FlexmoeError(f"expert package not found: {pkg}")
    return hashlib.sha256(_read(Path(pkg) / MANIFEST, 1 << 20, MANIFEST)).hexdigest()


def payload(pkg: Path) -> bytes:
    """The exact bytes signed: a domain tag and the sha256 of manifest.json."""
    return DOMAIN + _manifest_sha256(pkg).encode()


def sign_package(pkg: Path, key_path: Path) -> Signer:
    pkg = Path(pkg)
    key = load_private_key(key_path)
    digest = _manifest_sha256(pkg)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signer = Signer(key_id(raw), base64.b64encode(raw).decode())
    writable_file(pkg / SIGNATURE, "signature file")
    sig = key.sign(DOMAIN + digest.encode())
    doc = {"format": "flexmoe-signature", "version": 1, "algorithm": "ed25519"}
    doc |= {"public_key": signer.public_key, "key_id": signer.key_id, "manifest_sha256": digest}
    write_json(pkg / SIGNATURE, doc | {"signature": base64.b64encode(sig).decode()})
    return signer


def read_signature(pkg: Path) -> Signer | None:
    """None if unsigned; the signer if the signature is valid for the current manifest."""
    pkg = Path(pkg)
    digest = _manifest_sha256(pkg)
    path = pkg / SIGNATURE
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        s = _SignatureFile.model_validate_json(_read(path, 4096, SIGNATURE))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        raise FlexmoeError(f"{pkg}: invalid {SIGNATURE}: {loc}: {err['msg']}") from None
    if s.manifest_sha256 != digest:
        raise FlexmoeError(f"{pkg}: manifest changed since it was signed (tampered?)")
    try:
        pub = Ed25519PublicKey.from_public_bytes(_b64(s.public_key, 32))
        pub.verify(_b64(s.signature, 64), DOMAIN + digest.encode())
    except (InvalidSignature, ValueError):
        raise FlexmoeError(f"{pkg}: signature does not match the manifest (tampered?)") from None
    return Signer(s.key_id, s.public_key)


def load_trusted_keys(path: Path) -> dict[str, str]:
    """key id → base64 public key, from lines `ed25519 <base64> [comment]` (# comments)."""
    try:
        text = _read(Path(path), 1 << 20, "trusted keys file").decode("utf-8")
    except UnicodeDecodeError:
        raise FlexmoeError(f"{path}: trusted keys file is not UTF-8 text") from None
    keys: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            if parts[0] != "ed25519" or len(parts) < 2:
                raise ValueError
            keys[key_id(_b64(parts[1], 32))] = parts[1]
        except ValueError:
            raise FlexmoeError(f"{path}:{n}: not a line 'ed25519 <base64 key> [comment]'") from None
    if not keys:
        raise FlexmoeError(f"{path}: no keys")
    return keys


def check_trusted(pkg: Path, trusted: dict[str, str]) -> Signer:
    """The package's valid signer, if it is one of `trusted`; else FlexmoeError."""
    signer = read_signature(pkg)
    if signer is None:
        raise FlexmoeError(f"{pkg}: unsigned (a trusted signature is required)")
    if trusted.get(signer.key_id) != signer.public_key:
        raise FlexmoeError(f"{pkg}: signed by untrusted key {signer.key_id}")
    return signer
