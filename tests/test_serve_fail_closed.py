"""The server never fails open (issue 26, item 1). These run first in the suite (conftest).

- a keys file is validated strictly: one that the server accepts requires a key on every request;
- the key is checked and the body size-limited before the body is read;
- revocations reach every path that loads the merged model (CLI included) and requests already
  running (they stop using the expert at the next step; the ledger credits only what it made);
- a client that goes away has its row cancelled; --timeout bounds the whole request.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import random_merged, run_cli
from flexmoe.errors import FlexmoeError
from flexmoe.lifecycle.merge import merge
from flexmoe.serving import Keys, Limits, Server, key_hash
from flexmoe.serving import db as statedb
from flexmoe.serving.db import StateDB, database_url
from flexmoe.serving.tenants import read_keys_file
from flexmoe.store import revocations
from flexmoe.store.merged import experts_of
from test_serve import KEYS, NAMES, Running, free_port, raw

pytestmark = pytest.mark.security

ADMIN = f'admin_key_sha256 = "{key_hash(KEYS["admin"])}"\n'
ALPHA = f'[[tenants]]\nname = "alpha"\nkey_sha256 = "{key_hash(KEYS["alpha"])}"\n'


@pytest.fixture(scope="module")
def merged(work, anchor_dir):
    root = work / "fail-closed"
    root.mkdir()
    random_merged(root, anchor_dir, NAMES, 40)
    keys = root / "keys.toml"
    keys.write_text(ADMIN + ALPHA)
    return {"root": root, "model": root / "merged", "keys": keys}


# ---------------------------------------------------------------- the keys file
BAD_KEYS = {
    "empty file": "",
    "admin hash only": ADMIN,
    "typo [[tenant]]": ALPHA.replace("[[tenants]]", "[[tenant]]"),
    "[tenants] as a table": ALPHA.replace("[[tenants]]", "[tenants]"),
    "tenants = []": ADMIN + "tenants = []\n",
    "unknown top-level field": ADMIN + 'admin_key = "x"\n' + ALPHA,
    "unknown tenant field": ALPHA + 'expert = ["a"]\n',
    "tenant without a key": '[[tenants]]\nname = "alpha"\n',
    "tenant without a name": ALPHA.replace('name = "alpha"\n', ""),
    "short hash": ALPHA.replace(key_hash(KEYS["alpha"]), "abc123"),
    "upper-case hash": ALPHA.replace(key_hash(KEYS["alpha"]), key_hash(KEYS["alpha"]).upper()),
    "malformed admin hash": 'admin_key_sha256 = "nope"\n' + ALPHA,
    "experts not a list": ALPHA + 'experts = "a"\n',
    "unknown use": ALPHA + 'uses = ["evil"]\n',
    "no uses": ALPHA + "uses = []\n",
    "repeated tenant key": ALPHA + ALPHA.replace('"alpha"', '"alpha2"'),
    "admin key = tenant key": f'admin_key_sha256 = "{key_hash(KEYS["alpha"])}"\n' + ALPHA,
    "key hash as a number": '[[tenants]]\nname = "x"\nkey_sha256 = 12\n',
    "not TOML": "[[tenants\n",
    "unknown expert": ALPHA + 'experts = ["a", "zzz"]\n',
}


@pytest.mark.parametrize("case", sorted(BAD_KEYS))
def test_keys_file_that_opens_nothing_is_refused_at_startup(merged, case, capsys):
    """The CLI refuses it in one line with exit 2, before the model loads and before anything is
    written (no state directory appears)."""
    t = merged["root"] / "t.toml"
    t.write_text(BAD_KEYS[case])
    state = merged["root"] / f"state-{abs(hash(case))}"
    code, out, err = run_cli(
        ["serve", "--model", merged["model"], "--keys", t, "--state", state, "--port", free_port()],
        capsys,
    )
    assert code == 2, (case, out, err)
    assert err.startswith("error: keys file") and err.count("\n") == 1, err
    assert not state.exists()


def test_an_accepted_keys_file_always_requires_a_key(merged, tmp_path):
    """Every valid shape (with or without admin, narrow tenants) leaves no route open."""
    db = StateDB(database_url(None, tmp_path))
    assert Keys(db).open  # no tenant stored, none imported: the anonymous tenant
    for text in (ALPHA, ADMIN + ALPHA, ALPHA + 'experts = []\nuses = ["research"]\n'):
        p = tmp_path / "k.toml"
        p.write_text(text)
        keys = Keys(db, read_keys_file(p), p)
        assert not keys.open and keys.tenant(None) is None and keys.tenant("") is None
        assert keys.tenant("sk-wrong") is None and keys.tenant(KEYS["alpha"]).name == "alpha"
        assert not Keys(db).open  # the stored tenants hold for a replica given no keys file
    p.write_text("")
    with pytest.raises(FlexmoeError, match="at least one"):
        read_keys_file(p)


@pytest.fixture(scope="module")
def keyed(merged):
    server = Server(
        merged["model"],
        keys=merged["keys"],
        state_dir=merged["root"] / "state",
        limits=Limits(max_tokens=3000, timeout_s=60),
    )
    with Running(server) as running:
        yield {"server": server, "url": running.url, "root": merged["root"]}


@pytest.mark.parametrize(
    "method, path", [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                     ("GET", "/v1/models"), ("GET", "/v1/experts")]
)  # fmt: skip
@pytest.mark.parametrize("key", [None, "", "sk-wrong", KEYS["admin"]])
def test_every_api_route_needs_a_tenant_key(keyed, method, path, key):
    body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = raw(keyed, path, body if method == "POST" else None, key, method)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"


def _http(url: str, head: str, body: bytes = b"", read_timeout: float = 10) -> tuple[int, dict]:
    """Send raw bytes (headers, then as much body as given) and read the response."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _head(path: str, length: int, key: str | None = None, chunked: bool = False) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return "\r\n".join(lines) + "\r\n"


def test_unauthenticated_body_is_never_read(keyed):
    """A 50 MB body announced without a key: the 401 comes back although not one byte of the
    body was sent, so the server cannot have waited for it, let alone parsed it."""
    t0 = time.monotonic()
    status, body = _http(keyed["url"], _head("/v1/completions", 50_000_000))
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert time.monotonic() - t0 < 5


def test_oversized_body_is_refused_before_reading(keyed):
    limit = keyed["server"].limits.max_body_bytes
    status, body = _http(keyed["url"], _head("/v1/completions", 300_000_000, KEYS["alpha"]))
    assert status == 413 and f"{limit:,} bytes" in body["error"]["message"]
    # chunked (no Content-Length): counted while it arrives, refused once over the limit
    piece = b"x" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(limit // 65536 + 2))
    status, body = _http(keyed["url"], _head("/v1/completions", 0, KEYS["alpha"], True), chunks)
    assert status == 413
    ok = raw(keyed, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200  # and the server is fine


# ---------------------------------------------------------------- revocations everywhere
def test_revocation_reaches_the_cli_generate_eval_and_merge(merged, anchor_dir, capsys):
    root = merged["root"]
    model = root / "merged-cli"
    pkgs = [root / f"pkg-{n}" for n in NAMES]
    merge(anchor_dir, pkgs, model, log=None, preselect=0)
    state = revocations.default_state_dir(model)
    revocations.revoke(state, {}, "c")
    args = ["generate", "--model", model, "--prompt", "The cat", "--max-new-tokens", "4"]
    code, out, err = run_cli([*args, "--include", "c", "--attribution"], capsys)
    assert code == 0 and "expert 'c' masked: consent revoked" in err
    assert "c (off)" in out
    public_only = run_cli([*args, "--exclude", "a", "--exclude", "b"], capsys)[1]
    assert out.splitlines()[0] == public_only.splitlines()[0]  # c contributes nothing
    # a state dir given explicitly applies too, and one that is a file is refused
    other = root / "other-state"
    revocations.revoke(other, {}, "b")
    code, out, err = run_cli([*args, "--state", other, "--attribution"], capsys)
    assert code == 0 and "expert 'b' masked" in err
    code, _, err = run_cli([*args, "--state", root / "keys.toml"], capsys)
    assert code == 2 and "not a directory" in err
    # eval (library path of `flexmoe eval bpb`): the revoked expert is withheld
    from flexmoe.evaluation.heldout import load_for_eval
    from flexmoe.selection import expert_mask

    m, _ = load_for_eval(model)
    assert "c" in experts_of(m).withheld
    assert not expert_mask(m, include=["c"])[NAMES.index("c") + 1]
    # re-merging into the same output leaves the revoked expert out (as expired consent)
    notes = []
    res = merge(anchor_dir, pkgs, model, log=notes.append, preselect=0, overwrite=True)
    assert "c" not in res.experts and any("consent revoked" in n for n in notes)
    # a corrupt revocations file is a refusal, never "nothing revoked"
    (state / revocations.REVOKED).write_text("[1, 2]")
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "revocations file" in err


class PauseAt:
    """The engine's step lock, pausing the engine thread just before its n-th step: the test
    revokes there, between two steps, deterministically."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.count = inner, n, 0
        self.paused, self.resume = threading.Event(), threading.Event()

    def __enter__(self):
        if threading.current_thread().name == "flexmoe-engine":
            self.count += 1
            if self.count == self.n:
                self.paused.set()
                self.resume.wait(30)
        return self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


def test_revocation_reaches_a_running_request(keyed):
    """Revoked after its 4th token: the request keeps running without the expert from the next
    step on; the expert is credited only for what it helped generate before."""
    from openai import OpenAI

    from flexmoe.model.router import set_active_experts

    server = keyed["server"]
    body = dict(
        model="merged",
        prompt="The cat",
        max_tokens=24,
        temperature=0,
        extra_body={"experts": {"include": ["a"]}, "token_experts": True},
    )
    c = OpenAI(base_url=keyed["url"] + "/v1", api_key=KEYS["alpha"], max_retries=0)
    whole = c.completions.create(**body).model_extra["flexmoe"]
    assert whole["attribution"]["a"] > 0 and len(whole["tokens"]) == 24
    inner = server.engine.step_lock
    gate = server.engine.step_lock = PauseAt(inner, 5)  # prefill + 4 steps = 4 tokens made
    try:
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(c.completions.create, **body)
            assert gate.paused.wait(30)
            server.revoke("a")
            gate.resume.set()
            final = reply.result().model_extra["flexmoe"]
        assert 0 < final["attribution"]["a"] < whole["attribution"]["a"]
        assert [t["expert"] for t in final["tokens"][4:]] == ["public"] * 20
        assert final["active"] == ["public"]
        assert any(
            e["name"] == "a" and "during this request" in e["reason"] for e in final["excluded"]
        )
        last = json.loads(list(server.db.rows())[-1][1])
        assert last["attribution"] == pytest.approx(final["attribution"])
        after = c.completions.create(**{**body, "extra_body": {}}).model_extra["flexmoe"]
        assert after["attribution"]["a"] == 0.0  # and later requests do not get it at all
    finally:  # the module's server serves other tests: take the revocation back
        server.engine.step_lock = inner
        with inner:
            server.revoked.pop("a", None)
            experts_of(server.model).withheld.pop("a", None)
            set_active_experts(server.model, [True] * (len(NAMES) + 1))
            (server.state_dir / revocations.REVOKED).unlink(missing_ok=True)
            with server.db.engine.begin() as conn:
                conn.execute(statedb.revocations.delete())


# ---------------------------------------------------------------- cancel and time limits
def test_a_disconnected_clients_row_is_cancelled(keyed):
    server = keyed["server"]
    before = server.engine.abandoned
    body = json.dumps({"prompt": "The cat", "max_tokens": 3000, "temperature": 0}).encode()
    host, port = keyed["url"].removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(_head("/v1/completions", len(body), KEYS["alpha"]).encode() + b"\r\n" + body)
    time.sleep(0.5)
    s.close()
    t0 = time.monotonic()
    while server.engine.abandoned == before:
        assert time.monotonic() - t0 < 10, "the row of a client that went away kept generating"
        time.sleep(0.05)


def test_timeout_bounds_the_whole_request(merged):
    server = Server(
        merged["model"],
        keys=merged["keys"],
        state_dir=merged["root"] / "state-timeout",
        limits=Limits(max_tokens=3000, timeout_s=1.0),
    )
    with Running(server) as running:
        e = {"url": running.url}
        t0 = time.monotonic()
        r = raw(e, "/v1/completions", {"prompt": "x", "max_tokens": 3000, "temperature": 0})
        took = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["type"] == "server_error", r.text
        assert took < 5
        got = threading.Event()

        def stream():
            from openai import APIError, OpenAI

            c = OpenAI(base_url=running.url + "/v1", api_key=KEYS["alpha"], max_retries=0)
            try:
                for _ in c.completions.create(
                    model="merged", prompt="x", max_tokens=3000, temperature=0, stream=True
                ):
                    pass
            except APIError as err:
                got.set() if "timeout" in str(err) else None

        t0 = time.monotonic()
        stream()
        assert got.is_set() and time.monotonic() - t0 < 5
        t0 = time.monotonic()
        while server.engine.abandoned < 2:
            assert time.monotonic() - t0 < 5
            time.sleep(0.05)
