"""Fuzzing `flexmoe expert verify` with hypothesis: mutations of a valid package's safetensors
header and body bytes and of its manifest's JSON values. Every outcome must be a clean accept or
one line with exit 2: no traceback, nothing written, memory bounded."""

from __future__ import annotations

import json
import resource
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import random_package, run_cli
from flexmoe.store.package import MANIFEST, WEIGHTS

EXAMPLES = 240

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["header", "body", "length", "manifest-value", "manifest-bytes"]))
    if kind in ("header", "body", "manifest-bytes"):
        edits = draw(
            st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=4)
        )
        return kind, edits
    if kind == "length":
        return kind, draw(st.integers(-4096, 4096))
    return kind, (draw(st.integers(0, 2**31)), draw(json_values))


def _paths(obj, prefix=()):
    """Every path to a value in parsed JSON."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def apply(pkg: Path, kind: str, arg) -> None:
    if kind in ("header", "body"):
        data = bytearray((pkg / WEIGHTS).read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        lo, hi = (0, 8 + n) if kind == "header" else (8 + n, len(data))
        for pos, byte in arg:
            data[lo + pos % (hi - lo)] = byte
        (pkg / WEIGHTS).write_bytes(bytes(data))
    elif kind == "length":
        data = (pkg / WEIGHTS).read_bytes()
        data = data[:arg] if arg < 0 else data + b"\0" * arg
        (pkg / WEIGHTS).write_bytes(data)
    elif kind == "manifest-bytes":
        data = bytearray((pkg / MANIFEST).read_bytes())
        for pos, byte in arg:
            data[pos % len(data)] = byte
        (pkg / MANIFEST).write_bytes(bytes(data))
    else:
        m = json.loads((pkg / MANIFEST).read_text())
        paths = list(_paths(m))
        where, value = arg
        path = paths[where % len(paths)]
        if not path:
            m = value
        else:
            parent = m
            for p in path[:-1]:
                parent = parent[p]
            parent[path[-1]] = value
        (pkg / MANIFEST).write_text(json.dumps(m))


@pytest.fixture(scope="module")
def valid(work, anchor_dir) -> Path:
    return random_package(work / "fuzz-valid", anchor_dir, "fuzz", seed=5)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutation=mutations())
def test_mutated_package_is_accepted_or_refused_in_one_line(
    valid, anchor_dir, work, capsys, mutation
):
    pkg = work / "fuzz-case"
    shutil.rmtree(pkg, ignore_errors=True)
    shutil.copytree(valid, pkg)
    apply(pkg, *mutation)
    before = {p.name: p.read_bytes() for p in pkg.iterdir()}
    siblings = sorted(p.name for p in work.iterdir())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, out, err = run_cli(["expert", "verify", pkg, "--anchor", anchor_dir], capsys)
    assert "Traceback" not in err and "Traceback" not in out
    event(f"{mutation[0]}: exit {code}")
    if code == 0:
        assert out.startswith("ok: expert"), out
    else:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (mutation, err)
    assert {p.name: p.read_bytes() for p in pkg.iterdir()} == before  # nothing written
    assert sorted(p.name for p in work.iterdir()) == siblings
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 300_000  # KiB
