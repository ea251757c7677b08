"""Two `flexmoe serve` processes sharing one state database: revocations, limits, the ledger.

The same suite runs on SQLite (the default suite: two processes on one WAL file) and on a real
PostgreSQL server (`make test-postgres`, which installs Debian's `postgresql`): revoke through one
replica → 403 on the other at once; 32 concurrent clients spread over both with random expert
subsets → every text equal to the request served alone; per-tenant limits counted across
replicas (429 + Retry-After); kill -9 one replica mid-load → every completed response has its
ledger row, `flexmoe ledger verify` passes, and editing, deleting or cutting off any row fails it.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import random_merged, run_cli
from flexmoe.serving import db as statedb
from flexmoe.serving import key_hash
from test_serve import free_port

NAMES = ["a", "b", "c"]
KEYS = {"alpha": "sk-alpha-1", "limited": "sk-limited-2", "daily": "sk-daily-3", "admin": "sk-ad-4"}


class Reply:
    def __init__(self, status: int, body: bytes, headers):
        self.status_code, self.text, self.headers = status, body.decode(), headers

    def json(self):
        return json.loads(self.text)


def raw(where: dict, path: str, body=None, key: str | None = None, method: str = "POST"):
    """Plain HTTP (urllib): status codes and headers (Retry-After) as the client gets them."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if method == "POST" else None
    req = urllib.request.Request(where["url"] + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return Reply(r.status, r.read(), r.headers)
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read(), e.headers)


# ---------------------------------------------------------------- PostgreSQL, for real
def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.fail(f"PostgreSQL's {name} is not installed: run `make test-postgres` (installs it)")
    return found


class Postgres:
    """A throwaway PostgreSQL cluster on a Unix socket (as the `postgres` user when root:
    initdb refuses to run as root)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="flexmoe-pg-"))
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        data = self.dir / "data"
        self._run(_pg_bin("initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses='' -c fsync=off"
        self._run(_pg_bin("pg_ctl"), "-D", data, "-o", opts, "-l", self.dir / "log", "-w", "start")
        self.url = f"postgresql://postgres@/postgres?host={self.dir}&port={self.port}"

    def _run(self, *cmd) -> None:
        r = subprocess.run([*self.as_user, *map(str, cmd)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    def stop(self, remove: bool = True) -> None:
        if (self.dir / "data" / "postmaster.pid").exists():  # not stopped yet
            cmd = [_pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop"]
            subprocess.run([*self.as_user, *cmd], capture_output=True)
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- two replicas
class Replica:
    """`flexmoe serve` as operators run it: a subprocess on its own port and state directory."""

    def __init__(self, root: Path, db: str, i: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "flexmoe.cli", "serve", "--model", str(root / "merged")]
        cmd += ["--port", str(self.port), "--keys", str(root / "keys.toml"), "--device", "cpu"]
        cmd += ["--state", str(root / f"state-{i}"), "--db", db, "--max-batch", "8"]
        cmd += ["--signing-key", str(root / "op.key"), "--checkpoint-every", "1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = open(root / f"replica-{i}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_up(self) -> None:
        t0 = time.time()
        while True:
            try:
                raw({"url": self.url}, "/health", method="GET")
                return
            except OSError:
                assert self.proc.poll() is None, Path(self.log.name).read_text()[-3000:]
                assert time.time() - t0 < 300, "flexmoe serve did not come up"
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _keys_file(path: Path) -> None:
    def tenant(name: str, extra: str = "") -> str:
        return f'[[tenants]]\nname = "{name}"\nkey_sha256 = "{key_hash(KEYS[name])}"\n{extra}'

    path.write_text(
        f'admin_key_sha256 = "{key_hash(KEYS["admin"])}"\n'
        + tenant("alpha")
        + tenant("limited", "requests_per_minute = 3\n")
        + tenant("daily", "tokens_per_day = 5\n")
    )


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def shared(request, work, anchor_dir):
    from flexmoe.store.signing import new_key

    root = work / f"shared-{request.param}"
    root.mkdir()
    random_merged(root, anchor_dir, NAMES, 40)
    _keys_file(root / "keys.toml")
    new_key(root / "op.key")
    pg = Postgres() if request.param == "postgresql" else None
    db = pg.url if pg else str(root / "shared.db")
    replicas = [Replica(root, db, i) for i in range(2)]
    try:
        for r in replicas:
            r.wait_up()
        yield {"root": root, "db": db, "replicas": replicas, "backend": request.param, "pg": pg}
    finally:
        for r in replicas:
            r.stop()
        if pg:
            pg.stop()


def _complete(replica: Replica, key: str | None, body: dict):
    return raw({"url": replica.url}, "/v1/completions", body, key=key)


def _alone(root: Path):
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.inference.generate import generate
    from flexmoe.store.merged import load_model

    model = load_model(root / "merged").eval()
    tok = load_tokenizer(root / "merged")
    return lambda prompt, n, include: generate(model, tok, prompt, n, include=include)


def test_load_spread_over_both_replicas_equals_each_request_alone(shared):
    """32 concurrent clients over two processes, random expert subsets, mixed lengths: 0 errors,
    every text equal to the same request served alone."""
    rng = random.Random(1)
    prompts = ["The cat", "def f(x):", "Court rules", "3 + 4 =", "The sky of"]
    reqs = []
    for i in range(32):
        sub = [n for n in NAMES if rng.random() < 0.5] or None
        reqs.append((i % 2, prompts[i % len(prompts)], 2 + (i * 7) % 13, sub))

    def one(req):
        which, prompt, n, sub = req
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
        body |= {"experts": {"include": sub}} if sub else {}
        r = _complete(shared["replicas"][which], KEYS["alpha"], body)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, reqs))
    alone = _alone(shared["root"])
    for (_, prompt, n, sub), reply in zip(reqs, got, strict=True):
        ref = alone(prompt, n, sub)
        assert reply["choices"][0]["text"] == ref.text, (prompt, sub)
        assert reply["flexmoe"]["active"] == ref.active


def test_limits_hold_across_replicas(shared):
    a, b = shared["replicas"]
    if time.time() % 60 > 50:  # the per-minute window must not roll over mid-test
        time.sleep(61 - time.time() % 60)
    body = {"prompt": "x", "max_tokens": 2}
    assert [_complete(r, KEYS["limited"], body).status_code for r in (a, b, a)] == [200] * 3
    over = _complete(b, KEYS["limited"], body)
    assert over.status_code == 429 and over.json()["error"]["code"] == "requests_per_minute"
    assert 1 <= int(over.headers["retry-after"]) <= 60
    assert _complete(b, KEYS["alpha"], body).status_code == 200  # other tenants unaffected
    # 5 tokens a day: the first request (prompt + answer ≥ 5 tokens) spends them on replica a
    assert (
        _complete(a, KEYS["daily"], {"prompt": "The cat sat", "max_tokens": 4}).status_code == 200
    )
    over = _complete(b, KEYS["daily"], body)
    assert over.status_code == 429 and over.json()["error"]["code"] == "tokens_per_day"
    assert 1 <= int(over.headers["retry-after"]) <= 86400


def test_revoke_on_one_replica_is_403_on_the_other_at_once(shared):
    a, b = shared["replicas"]
    body = {"prompt": "x", "max_tokens": 2, "experts": {"include": ["c"]}}
    assert _complete(b, KEYS["alpha"], body).status_code == 200
    assert raw({"url": a.url}, "/admin/experts/c/revoke", {}, key=KEYS["admin"]).status_code == 200
    r = _complete(b, KEYS["alpha"], body)
    assert r.status_code == 403 and "revoked" in r.json()["error"]["message"]
    r = _complete(b, KEYS["alpha"], {"prompt": "x", "max_tokens": 3})
    assert r.json()["flexmoe"]["attribution"]["c"] == 0.0
    # and b's own state directory now records it, for the offline commands there
    local = json.loads((shared["root"] / "state-1" / "revoked.json").read_text())
    assert "c" in local


def test_kill_9_mid_load_leaves_a_verifiable_ledger(shared, capsys, tmp_path):
    a, b = shared["replicas"]
    reqs = [(i % 2, f"The {i} cat", 8 if i < 4 else 200) for i in range(16)]

    def one(req):
        which, prompt, n = req
        body = {"prompt": prompt, "max_tokens": n}
        try:
            r = _complete(shared["replicas"][which], KEYS["alpha"], body)
        except OSError:
            return None  # the killed replica's clients: no response, so no claim on the ledger
        return r.json()["id"] if r.status_code == 200 else None

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, r) for r in reqs]
        while not futures[0].done() and not futures[2].done():  # a's short ones are answered
            time.sleep(0.05)
        a.proc.send_signal(signal.SIGKILL)  # while a's long ones are still decoding
        ids = [f.result() for f in futures]
    assert any(i is None for i in ids[::2]), "the kill came after a had answered everything"
    done = [i for i in ids if i]
    assert all(ids[1::2]), "the surviving replica failed a request"
    store = statedb.StateDB(statedb.database_url(shared["db"], Path(".")))
    missing = set(done) - store.request_ids()
    assert not missing, f"completed responses without a ledger row: {sorted(missing)[:3]}"
    cp = raw({"url": b.url}, "/ledger/checkpoint", method="GET").json()
    (tmp_path / "cp.json").write_text(json.dumps(cp))
    pub = shared["root"] / "op.key.pub"
    verify = ["ledger", "verify", shared["db"], "--public-key", pub]
    code, out, err = run_cli([*verify, "--checkpoint", tmp_path / "cp.json"], capsys)
    assert code == 0 and "intact" in out and "a owner" in out, err
    # an owner holding another key does not accept these checkpoints
    from flexmoe.store.signing import new_key

    new_key(tmp_path / "other.key")
    code, _, err = run_cli([*verify[:3], "--public-key", tmp_path / "other.key.pub"], capsys)
    assert code == 2 and "not signed by a trusted key" in err

    rows = sorted(store.rows())
    last, middle = rows[-1], rows[len(rows) // 2]
    engine = store.engine
    L = statedb.ledger

    def fails(change, restore, expect: str) -> None:
        with engine.begin() as conn:
            conn.execute(change)
        try:
            code, _, err = run_cli(verify, capsys)
            assert code == 2 and expect in err, (expect, err)
        finally:
            with engine.begin() as conn:
                conn.execute(restore)
        assert run_cli(verify, capsys)[0] == 0

    edited = middle[1].replace('"completion_tokens":', '"completion_tokens":1')
    fails(
        L.update().where(L.c.seq == middle[0]).values(record=edited),
        L.update().where(L.c.seq == middle[0]).values(record=middle[1]),
        "hash does not match",
    )
    for seq, record, prev, h in (middle, last):
        row = dict(seq=seq, record=record, prev=prev, hash=h, tenant="alpha")
        row["request_id"] = json.loads(record)["request_id"]
        fails(
            L.delete().where(L.c.seq == seq),
            L.insert().values(**row),
            "a row is missing" if seq != last[0] else "rows cut off",
        )
    store.close()


def test_workers_share_one_ledger(shared, capsys):
    """`flexmoe serve --workers 2`: two processes on one port, one state database."""
    if shared["backend"] != "sqlite":
        pytest.skip("one host: the SQLite default is what --workers users get")
    import psutil

    root = shared["root"]
    port = free_port()
    cmd = [sys.executable, "-m", "flexmoe.cli", "serve", "--model", str(root / "merged")]
    cmd += ["--port", str(port), "--device", "cpu", "--workers", "2"]
    cmd += ["--state", str(root / "state-workers"), "--keys", str(root / "keys.toml")]
    log = open(root / "workers.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    where = {"url": f"http://127.0.0.1:{port}"}
    try:
        t0 = time.time()
        while True:
            try:
                raw(where, "/health", method="GET")
                break
            except OSError:
                assert proc.poll() is None, (root / "workers.log").read_text()[-3000:]
                assert time.time() - t0 < 300, "flexmoe serve --workers did not come up"
                time.sleep(0.2)
        body = {"prompt": "The cat", "max_tokens": 4, "temperature": 0}
        with ThreadPoolExecutor(8) as pool:
            got = list(
                pool.map(lambda _: raw(where, "/v1/completions", body, KEYS["alpha"]), range(8))
            )
        assert [r.status_code for r in got] == [200] * 8
        assert len({r.json()["choices"][0]["text"] for r in got}) == 1
        workers = [
            p for p in psutil.Process(proc.pid).children(recursive=True) if "python" in p.name()
        ]
        assert len(workers) >= 2
        db = root / "state-workers" / "flexmoe.db"
        code, out, err = run_cli(["ledger", "verify", db], capsys)
        assert code == 0 and "chain: 8 rows, intact" in out, err
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_a_database_that_is_down_fails_closed(shared):
    """PostgreSQL gone: no request is served (no key check, no unrecorded answer): 503."""
    if shared["pg"] is None:
        pytest.skip("a server process owns the SQLite file: it cannot go down alone")
    b = shared["replicas"][1]
    shared["pg"].stop(remove=False)
    r = _complete(b, KEYS["alpha"], {"prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and "database" in r.json()["error"]["message"]
    r = _complete(b, None, {"prompt": "x", "max_tokens": 2})
    assert r.status_code == 503  # not 200 as the anonymous tenant
