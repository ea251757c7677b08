"""Package signatures: real Ed25519 keys on real expert packages; every forgery or malformed
file is a one-line FlexmoeError, never another exception."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec as ec_keys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from conftest import random_package
from flexmoe.errors import FlexmoeError
from flexmoe.store.signing import (
    MANIFEST,
    SIGNATURE,
    check_trusted,
    load_private_key,
    load_trusted_keys,
    new_key,
    payload,
    read_signature,
    sign_package,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory, anchor_dir) -> dict:
    root = tmp_path_factory.mktemp("signing")
    keys = {name: root / "keys" / name for name in ("alice", "mallory")}
    ids = {name: new_key(path) for name, path in keys.items()}
    template = random_package(root / "template", anchor_dir, "code", seed=3)
    return {"root": root, "keys": keys, "ids": ids, "template": template}


@pytest.fixture
def pkg(env, tmp_path) -> Path:
    """A fresh copy of the unsigned template package."""
    return Path(shutil.copytree(env["template"], tmp_path / "pkg"))


def raises(pkg: Path, match: str) -> None:
    with pytest.raises(FlexmoeError, match=match) as e:
        read_signature(pkg)
    assert "\n" not in str(e.value) and str(pkg) in str(e.value)


def edit_signature(pkg: Path, **changes) -> None:
    path = pkg / SIGNATURE
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_sign_and_read_roundtrip(env, pkg):
    assert read_signature(pkg) is None
    signer = sign_package(pkg, env["keys"]["alice"])
    assert signer.key_id == env["ids"]["alice"]
    assert read_signature(pkg) == signer
    doc = json.loads((pkg / SIGNATURE).read_text())
    assert doc["format"] == "flexmoe-signature" and doc["version"] == 1
    assert doc["key_id"] == signer.key_id and doc["public_key"] == signer.public_key
    pub_line = env["keys"]["alice"].with_name("alice.pub").read_text()
    assert pub_line.split() == ["ed25519", signer.public_key, signer.key_id]
    # the signed bytes, checked independently of read_signature
    digest = hashlib.sha256((pkg / MANIFEST).read_bytes()).hexdigest()
    assert payload(pkg) == b"flexmoe-expert-package-signature-v1\n" + digest.encode()
    assert doc["manifest_sha256"] == digest
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(signer.public_key))
    public.verify(base64.b64decode(doc["signature"]), payload(pkg))


def test_changed_manifest_is_refused(env, pkg):
    sign_package(pkg, env["keys"]["alice"])
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["owner"] = "someone else"
    (pkg / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    raises(pkg, "manifest changed since it was signed")
    # pointing the signature file at the new manifest does not help: the signature is over it
    edit_signature(pkg, manifest_sha256=hashlib.sha256((pkg / MANIFEST).read_bytes()).hexdigest())
    raises(pkg, "signature does not match the manifest")


def test_flipped_signature_byte_is_refused(env, pkg):
    sign_package(pkg, env["keys"]["alice"])
    sig = bytearray(base64.b64decode(json.loads((pkg / SIGNATURE).read_text())["signature"]))
    sig[5] ^= 0x01
    edit_signature(pkg, signature=base64.b64encode(bytes(sig)).decode())
    raises(pkg, "signature does not match the manifest")


def test_signature_by_other_key_claiming_first_key_id_is_refused(env, pkg):
    alice = sign_package(pkg, env["keys"]["alice"])
    sign_package(pkg, env["keys"]["mallory"])
    edit_signature(pkg, key_id=alice.key_id)
    raises(pkg, "key_id does not belong to public_key")
    # claiming alice's public key too: the signature no longer verifies
    edit_signature(pkg, public_key=alice.public_key)
    raises(pkg, "signature does not match the manifest")


def test_check_trusted(env, pkg, tmp_path):
    trusted_file = tmp_path / "trusted"
    pub = env["keys"]["alice"].with_name("alice.pub").read_text()
    trusted_file.write_text(f"# builders' trust list\n\n{pub}")
    trusted = load_trusted_keys(trusted_file)
    assert list(trusted) == [env["ids"]["alice"]]
    with pytest.raises(FlexmoeError, match="unsigned"):
        check_trusted(pkg, trusted)
    sign_package(pkg, env["keys"]["alice"])
    assert check_trusted(pkg, trusted).key_id == env["ids"]["alice"]
    sign_package(pkg, env["keys"]["mallory"])
    with pytest.raises(FlexmoeError, match=f"untrusted key {env['ids']['mallory']}"):
        check_trusted(pkg, trusted)
    # same id, different public key: still untrusted
    with pytest.raises(FlexmoeError, match="untrusted key"):
        check_trusted(pkg, {env["ids"]["mallory"]: trusted[env["ids"]["alice"]]})


def test_new_key_refuses_overwrite_and_is_private(tmp_path):
    path = tmp_path / "keys" / "owner"
    kid = new_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not stat.S_IMODE(path.with_name("owner.pub").stat().st_mode) & 0o133
    before = path.read_bytes()
    with pytest.raises(FlexmoeError, match="already exists"):
        new_key(path)
    assert path.read_bytes() == before
    # a lone leftover .pub also blocks a new key
    lone = tmp_path / "k"
    lone.with_name("k.pub").write_text("x\n")
    with pytest.raises(FlexmoeError, match="already exists"):
        new_key(lone)
    assert not lone.exists()
    other = new_key(path, overwrite=True)
    assert other != kid and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.with_name("owner.pub").read_text().split()[2] == other
    assert isinstance(load_private_key(path), Ed25519PrivateKey)


def other_keys() -> list[bytes]:
    pkcs8, pem = serialization.PrivateFormat.PKCS8, serialization.Encoding.PEM
    encrypted = Ed25519PrivateKey.generate().private_bytes(
        pem, pkcs8, serialization.BestAvailableEncryption(b"secret")
    )
    ec = ec_keys.generate_private_key(ec_keys.SECP256R1())
    return [encrypted, ec.private_bytes(pem, pkcs8, serialization.NoEncryption())]


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"\xff" * 100, b"-----BEGIN PRIVATE KEY-----\nAAAA\n", b"x" * 20000]
    + other_keys(),
)
def test_load_private_key_refuses_non_keys(tmp_path, content):
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(FlexmoeError, match="private key") as e:
        load_private_key(path)
    assert "\n" not in str(e.value)


def test_load_trusted_keys_rejects_malformed_lines(env, tmp_path):
    good = env["keys"]["alice"].with_name("alice.pub").read_text().strip()
    path = tmp_path / "trusted"
    for bad in ["rsa AAAA", "ed25519", "ed25519 not-base64!", "ed25519 " + "A" * 40]:
        path.write_text(f"# keys\n{good}\n\n{bad}\n")
        with pytest.raises(FlexmoeError, match=f"{path}:4:"):
            load_trusted_keys(path)
    path.write_text("# nobody\n\n")
    with pytest.raises(FlexmoeError, match="no keys"):
        load_trusted_keys(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b"{}",
        b'{"format": "flexmoe-signature"' + b" " * 5000 + b"}",
    ],
)
def test_garbage_signature_file_is_a_flexmoe_error(env, pkg, content):
    sign_package(pkg, env["keys"]["alice"])
    (pkg / SIGNATURE).write_bytes(content)
    raises(pkg, "signature.json")


@pytest.mark.parametrize(
    "changes",
    [
        {"version": True},
        {"version": 1.0},
        {"version": 2},
        {"algorithm": "rsa"},
        {"extra": 1},
        {"public_key": "AAAA"},
        {"signature": "!!"},
        {"signature": None},
    ],
)
def test_malformed_signature_fields_are_refused(env, pkg, changes):
    sign_package(pkg, env["keys"]["alice"])
    edit_signature(pkg, **changes)
    raises(pkg, "invalid signature.json")


@pytest.mark.parametrize("kind", ["dir", "fifo", "device"])
def test_signature_that_is_not_a_regular_file_is_refused(env, pkg, kind):
    path = pkg / SIGNATURE
    {
        "dir": path.mkdir,
        "fifo": lambda: os.mkfifo(path),
        "device": lambda: path.symlink_to("/dev/zero"),
    }[kind]()
    raises(pkg, "not a regular file")


def test_oversized_manifest_is_refused(env, pkg):
    sign_package(pkg, env["keys"]["alice"])
    with open(pkg / MANIFEST, "ab") as f:
        f.write(b" " * (1 << 20))
    raises(pkg, "larger than")
