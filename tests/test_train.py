"""The shared training loop: schedule, exact resume, and 2-process FSDP2 over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flexmoe.lifecycle.anchor import train_anchor
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.train.loop import TrainConfig, lr_at


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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ANCHOR_ARGS = ["anchor", "train", "--preset", "tiny", "--steps", "12", "--router-docs", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FLEXMOE_NO_PROGRESS": "1"}


def run_anchor(out, tok_dir, shards, procs: int, *extra) -> subprocess.CompletedProcess:
    """`flexmoe anchor train` in 1 process or under torchrun with `procs` processes (gloo)."""
    args = [*ANCHOR_ARGS, "--data", shards["public/train"], "--tokenizer", tok_dir, *extra]
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(procs)]
        launcher += ["--master-port", str(free_port())]
    r = subprocess.run(
        [*launcher, "-m", "flexmoe.cli", *map(str, args), "--out", str(out)],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(p):
    recs = [
        json.loads(x)
        for x in (p.parent / (p.name + ".train") / "metrics.jsonl").read_text().splitlines()
    ]
    return [r["loss"] for r in recs if "loss" in r and "seconds" not in r]


def max_diff(a, b) -> float:
    m1, m2 = load_anchor(a)[0], load_anchor(b)[0]
    return max(
        (x - y).abs().max().item()
        for x, y in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
    )


def test_two_process_fsdp2_matches_single_process(work, tok_dir, shards):
    """torchrun --nproc-per-node 2 (gloo, FSDP2) sees the same global batches as one process."""
    single, dual = work / "single", work / "dual"
    run_anchor(single, tok_dir, shards, 1, "--ckpt-every", "6")
    run_anchor(dual, tok_dir, shards, 2, "--ckpt-every", "6")
    l1, l2 = losses(single), losses(dual)
    assert len(l1) == len(l2) > 0
    # gradient all-reduce sums in another order: tolerance 1e-3 on a loss of ~6 after 12 steps
    assert max(abs(a - b) for a, b in zip(l1, l2, strict=True)) < 1e-3
    assert max_diff(single, dual) < 1e-3


@pytest.mark.parametrize("first, then", [(1, 2), (2, 1)])
def test_sharded_checkpoint_resumes_on_another_world_size(work, tok_dir, shards, first, then):
    """A run killed after a DCP checkpoint written by `first` processes, resumed by `then`
    processes, ends where an uninterrupted run ends (cross-process sums: tolerance 1e-3)."""
    full = work / "dcp-full"
    if not full.exists():
        run_anchor(full, tok_dir, shards, 1)
    part = work / f"dcp-{first}to{then}"
    run_anchor(part, tok_dir, shards, first, "--ckpt-every", "6", "--stop-after", "8")
    ckpt = part.parent / (part.name + ".train") / "checkpoints" / "step_0000006"
    assert (ckpt / ".metadata").is_file() and not part.exists()
    assert len(list(ckpt.glob("*.distcp"))) == first  # one shard file per writing process
    run_anchor(part, tok_dir, shards, then, "--ckpt-every", "6", "--resume")
    assert max_diff(full, part) < 1e-3
    steps = [json.loads(x).get("step") for x in (ckpt.parent.parent / "metrics.jsonl").open()]
    early = [s for s in steps if s is not None and s < 12]
    assert early and len(early) == len(set(early))  # no step logged twice across the resume


def test_checkpoints_are_not_deleted_without_restart(work, tok_dir, shards):
    from flexmoe.errors import FlexmoeError

    out = work / "keep-ckpt"
    _train(out, tok_dir, shards, ckpt_every=5, stop_after=6)
    with pytest.raises(FlexmoeError, match="--restart"):
        _train(out, tok_dir, shards)
    _train(out, tok_dir, shards, restart=True)
    assert (out / "config.json").is_file()


def test_device_option(work, tok_dir, shards, capsys):
    """--device cpu trains here; a device this machine lacks is a one-line error before work."""
    from conftest import run_cli

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: scripts/gpu_smoke.sh covers it")
    base = ["anchor", "train", "--data", shards["public/train"], "--tokenizer", tok_dir]
    base += ["--preset", "tiny", "--steps", "2", "--router-docs", "4"]
    code, _, err = run_cli([*base, "--device", "cuda", "-o", work / "dev-cuda"], capsys)
    assert code == 2 and err.strip().startswith("error: --device cuda: no CUDA device")
    assert not (work / "dev-cuda").exists()
    code, _, err = run_cli([*base, "--device", "cpu", "-o", work / "dev-cpu"], capsys)
    assert code == 0, err
