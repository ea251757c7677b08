"""`flexmoe expert compress`: low-rank packages (SVD of expert − anchor FFN) verify, merge and
behave as the full package they approximate; an exactly low-rank delta is reproduced exactly."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_package, run_cli
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.package import load_tensors, read_manifest, verify_package, write_package


@pytest.fixture(scope="module")
def lowrank_pkg(work, anchor_dir):
    """A package whose FFN differs from the anchor's by an exactly rank-4 matrix per matrix."""
    src = random_package(work / "cmp-src", anchor_dir, "code", seed=5)
    anchor, _, _ = load_anchor(anchor_dir)
    t = load_tensors(src)
    g = torch.Generator().manual_seed(0)
    for i, layer in enumerate(anchor.model.layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(layer.mlp, proj).weight.detach().float()
            a = torch.randn(w.shape[0], 4, generator=g) * 0.05
            b = torch.randn(4, w.shape[1], generator=g) * 0.05
            t[f"layers.{i}.{proj}"] = w + a @ b
    m = json.loads(read_manifest(src).model_dump_json(exclude={"tensors"}))
    write_package(work / "cmp-lowrank", t, m)
    return work / "cmp-lowrank"


def _logits(merged_dir, ids):
    from flexmoe.store.merged import load_model

    with torch.no_grad():
        return load_model(merged_dir).float().eval()(input_ids=ids).logits


def test_exact_rank_is_reproduced(work, anchor_dir, lowrank_pkg, capsys):
    out = work / "cmp-r4"
    code, stdout, err = run_cli(
        ["expert", "compress", lowrank_pkg, "--anchor", anchor_dir, "-o", out, "--rank", "4"],
        capsys,
    )
    assert code == 0, err
    assert "energy kept 1.0000" in stdout
    m = read_manifest(out)
    assert set(m.compression.ranks.values()) == {4}
    assert m.compression.parameters_stored < m.compression.parameters_full
    stored = load_tensors(out)
    assert not any(k.endswith("gate_proj") for k in stored)  # only factors are stored
    anchor, record, extras = load_anchor(anchor_dir)
    _, full = verify_package(lowrank_pkg, record, extras, anchor)
    _, back = verify_package(out, record, extras, anchor)
    assert set(back) == set(full)
    assert max(float((back[k] - full[k]).abs().max()) for k in full) < 1e-5
    # --energy finds the same rank; the verify CLI accepts the package
    out2 = work / "cmp-e"
    args = ["expert", "compress", lowrank_pkg, "--anchor", anchor_dir, "-o", out2]
    assert run_cli([*args, "--energy", "0.9999"], capsys)[0] == 0
    assert set(read_manifest(out2).compression.ranks.values()) == {4}
    code, stdout, err = run_cli(["expert", "verify", out, "--anchor", anchor_dir], capsys)
    assert code == 0 and "verified" in stdout, err


def test_merge_with_compressed_expert(work, anchor_dir, lowrank_pkg, capsys):
    from flexmoe.lifecycle.merge import merge

    other = random_package(work / "cmp-math", anchor_dir, "math", seed=6)
    r4, r1 = work / "cmp-m-r4", work / "cmp-m-r1"
    for rank, pkg in (("4", r4), ("1", r1)):
        args = ["expert", "compress", lowrank_pkg, "--anchor", anchor_dir, "-o", pkg]
        assert run_cli([*args, "--rank", rank], capsys)[0] == 0
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    full = _logits(merge(anchor_dir, [lowrank_pkg, other], work / "cmp-mf", log=None).path, ids)
    same = _logits(merge(anchor_dir, [r4, other], work / "cmp-m4", log=None).path, ids)
    less = _logits(merge(anchor_dir, [r1, other], work / "cmp-m1", log=None).path, ids)
    assert float((same - full).abs().max()) < 1e-4
    assert float((less - full).abs().max()) > 1e-3  # rank 1 of a rank-4 delta is lossy
    assert read_manifest(r1).compression.energy < 0.99


def test_compress_refusals(work, anchor_dir, lowrank_pkg, capsys):
    out = work / "cmp-bad"
    base = ["expert", "compress", lowrank_pkg, "--anchor", anchor_dir, "-o", out]
    for extra, msg in (
        (["--rank", "4", "--energy", "0.9"], "exactly one"),
        ([], "exactly one"),
        (["--energy", "0"], "--energy"),
        (["--energy", "1.5"], "--energy"),
        (["--rank", "0"], "--rank"),
    ):
        code, _, err = run_cli([*base, *extra], capsys)
        assert code == 2 and msg in err, err
        assert not out.exists()
    # a tampered factor is caught by its hash
    good = work / "cmp-r2"
    assert run_cli([*base[:-1], good, "--rank", "2"], capsys)[0] == 0
    from safetensors.torch import load_file, save_file

    t = load_file(good / "expert.safetensors")
    t["layers.0.up_proj.u"] = t["layers.0.up_proj.u"] * 1.01
    save_file(t, good / "expert.safetensors")
    code, _, err = run_cli(["expert", "verify", good, "--anchor", anchor_dir], capsys)
    assert code == 2 and "sha256" in err
