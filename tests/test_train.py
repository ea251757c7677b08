"""The shared training loop: schedule, exact resume, and 2-process FSDP2 over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flexmoe.anchor import load_anchor, train_anchor
from flexmoe.train import TrainConfig, lr_at


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 99) == pytest.approx(0.1, abs=1e-3)
    lrs = [lr_at(cfg, s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def _train(out, tok_dir, shards, **kw):
    return train_anchor(
        shards["public/train"],
        out,
        tok_dir,
        preset="tiny",
        steps=16,
        router_docs=4,
        grad_accum=2,
        **kw,
    )


def test_resume_is_bit_identical(work, tok_dir, shards):
    """Kill mid-way (after a checkpoint), resume, and end with the same weights."""
    full = _train(work / "full", tok_dir, shards)
    part = _train(work / "part", tok_dir, shards, ckpt_every=5, stop_after=12)
    assert part.get("stopped") and not (work / "part").exists()
    resumed = _train(work / "part", tok_dir, shards, ckpt_every=5, resume=True)
    assert resumed["fingerprint"] == full["fingerprint"]
    a = load_file(work / "full" / "model.safetensors")
    b = load_file(work / "part" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_is_an_error(work, tok_dir, shards):
    from flexmoe.errors import FlexmoeError

    with pytest.raises(FlexmoeError, match="no checkpoint"):
        _train(work / "never", tok_dir, shards, resume=True)


def test_two_process_fsdp2_matches_single_process(work, tok_dir, shards):
    """torchrun --nproc-per-node 2 (gloo, FSDP2) sees the same global batches as one process."""
    single = work / "single"
    dual = work / "dual"
    args = [
        "anchor",
        "train",
        "--data",
        shards["public/train"],
        "--tokenizer",
        tok_dir,
        "--preset",
        "tiny",
        "--steps",
        "12",
        "--router-docs",
        "4",
        "--ckpt-every",
        "6",
    ]
    _train_cli = [sys.executable, "-m", "flexmoe.cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLEXMOE_NO_PROGRESS": "1"}
    subprocess.run([*_train_cli, "--out", str(single)], check=True, env=env, capture_output=True)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
    ]
    r = subprocess.run(
        [*torchrun, "-m", "flexmoe.cli", *map(str, args), "--out", str(dual)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    def losses(p):
        recs = [
            json.loads(x)
            for x in (p.parent / (p.name + ".train") / "metrics.jsonl").read_text().splitlines()
        ]
        return [r["loss"] for r in recs if "loss" in r and "seconds" not in r]

    l1, l2 = losses(single), losses(dual)
    assert len(l1) == len(l2) > 0
    # gradient all-reduce sums in another order: tolerance 1e-3 on a loss of ~6 after 12 steps
    assert max(abs(a - b) for a, b in zip(l1, l2, strict=True)) < 1e-3
    # the checkpoint written by 2 processes loads in one process
    m1, _, _ = load_anchor(single)
    m2, rec2, _ = load_anchor(dual)
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
    )
    assert diff < 1e-3
    ck = load_file(
        dual.parent / "dual.train" / "checkpoints" / "step_0000012" / "model.safetensors"
    )
    m2.load_state_dict(ck)
