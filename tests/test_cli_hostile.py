"""Hostile but realistic CLI input (issue 26): each case is a real `flexmoe` process that must
refuse with exit 2 and exactly one line on stderr (never "internal error"), write nothing, stay
within bounded memory and time, and answer before any model is loaded where the option alone is
wrong.

`FLEXMOE_CASE_TABLE=FILE` appends one JSON line per case (id, exit code, stderr line, peak RSS,
seconds): the before → after table of the closing note is made from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import random_package, write_jsonl

MAX_RSS = 1 << 30  # every refusal below stays under 1 GiB peak (python + torch included)
TIMEOUT_S = 120


@dataclass
class Case:
    id: str
    args: list[str]  # {anchor} {merged} {tok} {pkg} {key} {shards} {d}: paths; {d} = case dir
    expect: str  # a substring of the one error line
    setup: Callable[[Path, dict[str, Path]], None] | None = None  # (case dir, fixture paths)


def _text(name: str, data: str | bytes) -> Callable[[Path, dict], None]:
    def make(d: Path, _paths: dict) -> None:
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)

    return make


def _line(rec: object) -> str:
    return json.dumps(rec) + "\n"


GOOD = {"tenant": "t", "completion_tokens": 4, "attribution": {"public": 0.5, "code": 0.5}}


def _xz_corrupt(d: Path, _paths: dict) -> None:
    import lzma

    raw = lzma.compress(_line(GOOD).encode() * 50)
    (d / "ledger.jsonl.xz").write_bytes(raw[: len(raw) // 2] + b"\0" * 32)


def _fifo(name: str) -> Callable[[Path, dict], None]:
    return lambda d, _paths: os.mkfifo(d / name)


def _keys_pub_dir(d: Path, _paths: dict) -> None:
    (d / "K").write_text("old")
    (d / "K.pub").mkdir()


def _signed_dir(d: Path, paths: dict) -> None:
    shutil.copytree(paths["pkg"], d / "pkg")
    (d / "pkg" / "signature.json").mkdir()


def _json_line_200mb(d: Path, _paths: dict) -> None:
    with open(d / "big.jsonl", "w") as f:
        f.write('{"text": "')
        chunk = "lorem ipsum dolor sit amet " * 40_000  # ~1 MB
        for _ in range(200):
            f.write(chunk)
        f.write('"}\n')


def _previous_shards(d: Path, paths: dict) -> None:
    from flexmoe.data.shards import tokenize_to_shards

    tokenize_to_shards([d / "docs.jsonl"], d / "out", paths["tok"])
    (d / "out" / "NOTES.md").write_text("the user's notes")


LEDGER = ["ledger", "summarize"]
GEN = ["generate", "--model", "{merged}", "--prompt", "def f():"]
SERVE = ["serve", "--model", "{merged}", "--port", "{port}"]
BPB = ["eval", "bpb", "--model", "{anchor}", "--data", "{shards}"]
TOKENIZE = ["data", "tokenize", "{d}/docs.jsonl", "--tokenizer", "{tok}", "-o", "{d}/out"]
TRAIN = ["expert", "train", "--anchor", "{anchor}", "--data", "{shards}/code/train", "--name", "c"]
IMPORT = ["anchor", "import", "{anchor}", "-o", "{d}/a", "--public", "{d}/docs.jsonl"]

GGUF = ["export", "gguf", "{merged}", "-o", "{d}/m.gguf"]

CASES = [
    # keys and signatures: files of the wrong kind, impossible places
    Case("keys new ''", ["keys", "new", ""], "must name a file"),
    Case("keys new K.pub=dir", ["keys", "new", "K", "--overwrite"], "K.pub", _keys_pub_dir),
    Case("keys new /proc", ["keys", "new", "/proc/flexmoe-key"], "/proc/flexmoe-key"),
    Case(
        "expert sign sig=dir",
        ["expert", "sign", "pkg", "--key", "{key}"],
        "signature.json",
        _signed_dir,
    ),
    # the ledger: corrupt or wrong, never a traceback, never a silent skip or a nan
    Case("ledger nested 100k", [*LEDGER, "l.jsonl"], "nested", _text("l.jsonl", "[" * 100_000)),
    Case(
        "ledger attribution list",
        [*LEDGER, "l.jsonl"],
        "attribution",
        _text("l.jsonl", _line(GOOD | {"attribution": [1]})),
    ),
    Case(
        "ledger random bytes", [*LEDGER, "l.jsonl"], "l.jsonl", _text("l.jsonl", os.urandom(4096))
    ),
    Case("ledger corrupt xz", [*LEDGER, "ledger.jsonl.xz"], "corrupt", _xz_corrupt),
    Case(
        "ledger invalid utf-8",
        [*LEDGER, "l.jsonl"],
        "UTF-8",
        _text("l.jsonl", _line(GOOD).encode()[:-3] + b'\xff"}\n'),
    ),
    Case(
        "ledger NaN share",
        [*LEDGER, "l.jsonl"],
        "not in [0, 1]",
        _text(
            "l.jsonl",
            _line(GOOD) + '{"tenant": "t", "completion_tokens": 3, "attribution": {"code": NaN}}\n',
        ),
    ),
    Case(
        "ledger non-object line",
        [*LEDGER, "l.jsonl"],
        "not a ledger record",
        _text("l.jsonl", _line(GOOD) + "[1, 2]\n"),
    ),
    Case(
        "ledger tokens as string",
        [*LEDGER, "l.jsonl"],
        "completion_tokens",
        _text("l.jsonl", _line(GOOD | {"completion_tokens": "5"})),
    ),
    Case("ledger is a dir", [*LEDGER, "{d}"], "not a regular file"),
    # the state database a data owner verifies: never created, upgraded or trusted blindly
    Case("verify missing db", ["ledger", "verify", "{d}/none.db"], "state database is missing"),
    Case("verify db is a dir", ["ledger", "verify", "{d}"], "not a regular file"),
    Case(
        "verify random bytes",
        ["ledger", "verify", "x.db"],
        "state database",
        _text("x.db", os.urandom(8192)),
    ),
    Case("verify db url scheme", ["ledger", "verify", "mysql://u@h/db"], "unsupported database"),
    Case(
        "verify bad checkpoint",
        ["ledger", "verify", "{d}/none.db", "--checkpoint", "cp.json"],
        "not a ledger checkpoint",
        _text("cp.json", '{"seq": 1}'),
    ),
    Case(
        "serve --db scheme",
        [*SERVE, "--db", "ftp://h/x", "--state", "{d}/s"],
        "unsupported database",
    ),
    Case("ledger is a fifo", [*LEDGER, "l.jsonl"], "not a regular file", _fifo("l.jsonl")),
    # outputs of the wrong kind, checked before the work
    Case(
        "audit --json dir",
        ["audit", "{shards}/code/train", "--model", "{merged}", "--json", "{d}"],
        "not a regular file",
    ),
    Case(
        "audit --json over a user file",
        ["audit", "{shards}/code/train", "--model", "{merged}", "--json", "mine.json"],
        "flexmoe-audit/1",
        _text("mine.json", '{"mine": 1}'),
    ),
    Case(
        "expert proxy -o over a user file",
        [
            "expert",
            "proxy",
            "--data",
            "{d}/docs.jsonl",
            "--public",
            "{d}/docs.jsonl",
            "-o",
            "p.json",
        ],
        "flexmoe-proxies",
        _text("p.json", '{"mine": 1}'),
    ),
    Case("serve --state file", [*SERVE, "--state", "s"], "not a directory", _text("s", "x")),
    Case(
        "serve [tenants] table",
        [*SERVE, "--keys", "t.toml"],
        "t.toml",
        _text("t.toml", '[tenants]\nname = "a"\n'),
    ),
    # options out of range, NaN, conflicts: refused before any model loads
    Case("serve --max-tokens -1", [*SERVE, "--max-tokens", "-1"], "--max-tokens"),
    Case("serve --timeout -1", [*SERVE, "--timeout", "-1"], "--timeout"),
    Case("serve --timeout nan", [*SERVE, "--timeout", "nan"], "--timeout"),
    Case("serve --max-prompt-tokens 0", [*SERVE, "--max-prompt-tokens", "0"], "--max-prompt"),
    Case("serve --host 999.1.1.1", [*SERVE, "--host", "999.1.1.1"], "cannot bind"),
    Case("serve --port 70000", [*SERVE, "--port", "70000"], "--port"),
    Case("generate include=exclude", [*GEN, "--include", "code", "--exclude", "code"], "both"),
    Case("generate --seed -1", [*GEN, "--seed", "-1"], "--seed"),
    Case("generate --temperature nan", [*GEN, "--temperature", "nan"], "--temperature"),
    Case("generate --top-p 0", [*GEN, "--top-p", "0"], "--top-p"),
    Case("generate --max-new-tokens 0", [*GEN, "--max-new-tokens", "0"], "--max-new-tokens"),
    Case(
        "generate 100k-char prompt",
        ["generate", "--model", "{merged}", "--prompt", "word " * 20_000],
        "positions",
    ),
    Case("eval bpb --seq-len 100000", [*BPB, "--seq-len", "100000"], "positions"),
    Case("eval bpb --max-tokens 1", [*BPB, "--max-tokens", "1"], "one window"),
    Case("eval bpb --max-tokens 100", [*BPB, "--max-tokens", "100"], "one window"),
    Case(
        "eval tasks --limit -1", ["eval", "tasks", "--model", "{merged}", "--limit", "-1"], "limit"
    ),
    Case(
        "expert train --lr nan",
        [*TRAIN, "-o", "{d}/p", "--lr", "nan"],
        "--lr",
    ),
    Case("expert train without --public", [*TRAIN, "-o", "{d}/p"], "pass --public"),
    Case(
        "audit --trained-by, other data",
        ["audit", "{shards}/public/train", "--model", "{merged}", "--trained-by", "{pkg}"],
        "--trained-by",
    ),
    Case(
        "expert train --dp-epsilon 0",
        [*TRAIN, "-o", "{d}/p", "--dp-epsilon", "0"],
        "--dp-epsilon",
    ),
    Case(
        "merge --top-k 0",
        ["merge", "--anchor", "{anchor}", "-o", "{d}/m", "--experts", "{pkg}", "--top-k", "0"],
        "--top-k",
    ),
    Case(
        "anchor train --steps 0",
        [
            "anchor",
            "train",
            "--data",
            "{shards}/public/train",
            "-o",
            "{d}/a",
            "--tokenizer",
            "{tok}",
            "--steps",
            "0",
        ],
        "--steps",
    ),
    Case("anchor import --router-docs -1", [*IMPORT, "--router-docs", "-1"], "--router-docs"),
    Case("anchor import --router-docs 0", [*IMPORT, "--router-docs", "0"], "--router-docs"),
    # tokenization: option ranges, non-regular inputs, a huge line
    Case("tokenize --shard-tokens 0", [*TOKENIZE, "--shard-tokens", "0"], "--shard-tokens"),
    Case("tokenize --shard-tokens -1", [*TOKENIZE, "--shard-tokens", "-1"], "--shard-tokens"),
    Case(
        "tokenize fifo x.txt",
        ["data", "tokenize", "x.txt", "--tokenizer", "{tok}", "-o", "{d}/out"],
        "not a regular file",
        _fifo("x.txt"),
    ),
    Case(
        "tokenize 200 MB JSON line",
        ["data", "tokenize", "big.jsonl", "--tokenizer", "{tok}", "-o", "{d}/out"],
        "MiB",
        _json_line_200mb,
    ),
    # a previous output holding the user's file is not replaced without --overwrite
    Case("tokenize over user file", TOKENIZE, "NOTES.md", _previous_shards),
    # export gguf: refused before any model is loaded where the option or the family is wrong
    Case("export gguf --type q4_k", [*GGUF, "--type", "q4_k"], "--type"),
    Case("export gguf FlexOlmo", GGUF, "no FlexOlmo architecture"),
    Case("export gguf -o dir", ["export", "gguf", "{merged}", "-o", "{d}"], "not a regular file"),
    Case("export gguf over user file", GGUF, "refusing to replace", _text("m.gguf", "mine")),
    Case("export gguf no config", ["export", "gguf", "{d}", "-o", "{d}/m.gguf"], "config.json"),
]


@pytest.fixture(scope="module")
def paths(work, anchor_dir, tok_dir, shards) -> dict[str, Path]:
    from flexmoe.lifecycle.merge import merge
    from flexmoe.store.signing import new_key

    root = work / "hostile-cli"
    root.mkdir()
    pkgs = [random_package(root / n, anchor_dir, n, seed=i) for i, n in enumerate(["code", "math"])]
    merge(anchor_dir, pkgs, root / "merged", log=None)
    new_key(root / "key")
    return {
        "anchor": anchor_dir,
        "merged": root / "merged",
        "tok": tok_dir,
        "pkg": pkgs[0],
        "key": root / "key",
        "shards": shards["public/train"].parent.parent,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    snap = {}
    for root in roots:
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            st = p.lstat()  # a directory's own mtime moves when a temp entry comes and goes
            snap[str(p)] = (0, 0) if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return snap


# Linux keeps a process's peak RSS across fork and exec, so the CLI is started by a small
# launcher (not by pytest itself) and its peak is read from the launcher's RUSAGE_CHILDREN.
LAUNCHER = """
import os, resource, subprocess, sys
code = subprocess.call([sys.executable, "-m", "flexmoe.cli", *sys.argv[2:]])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(code)
"""


def _run(argv: list[str], cwd: Path) -> tuple[int, str, str, int, float]:
    """A real `flexmoe` process: exit code, stdout, stderr, peak RSS (bytes), seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rss_file = cwd.parent / f"{cwd.name}.rss"
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(rss_file), *argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {TIMEOUT_S} s")
    secs = time.monotonic() - t0
    return proc.returncode, proc.stdout, proc.stderr, int(rss_file.read_text()), secs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_refuses_cleanly(case: Case, paths, tmp_path):
    d = tmp_path / "case"
    d.mkdir()
    write_jsonl(d / "docs.jsonl", ["a small document", "another one"])
    if case.setup is not None:
        case.setup(d, paths)
    subst = {k: str(v) for k, v in paths.items()} | {"d": str(d), "port": str(_free_port())}
    argv = [a.format(**subst) if "{" in a and " " not in a else a for a in case.args]
    watched = [d, *(Path(v) for k, v in paths.items() if k != "shards")]
    before = _snapshot(*watched)
    code, out, err, rss, secs = _run(argv, d)
    lines = err.strip().splitlines()
    if table := os.environ.get("FLEXMOE_CASE_TABLE"):
        with open(table, "a") as f:
            rec = {"id": case.id, "code": code, "err": lines[-1][:160] if lines else ""}
            f.write(json.dumps(rec | {"rss_mb": rss >> 20, "s": round(secs, 1)}) + "\n")
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "internal error" not in err and case.expect in lines[0], lines[0]
    assert out == ""
    assert rss < MAX_RSS, f"peak RSS {rss >> 20} MiB"
    assert _snapshot(*watched) == before  # nothing written, nothing removed


def test_file_outputs_replace_only_their_own(tmp_path):
    from flexmoe.errors import FlexmoeError
    from flexmoe.store.fsutil import guard_file, write_json

    out = tmp_path / "r.json"
    assert guard_file(out, "--json", "fmt/1") == out  # new
    write_json(out, {"format": "fmt/1", "x": 1})
    assert guard_file(out, "--json", "fmt/1") == out  # a previous output of the same command
    out.write_text('{"format": "other"}')
    with pytest.raises(FlexmoeError, match="--overwrite"):
        guard_file(out, "--json", "fmt/1")
    assert guard_file(out, "--json", "fmt/1", overwrite=True) == out
