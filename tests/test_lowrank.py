"""`expert train --rank R`: the owner's FFN trained as anchor + B·A (model/lowrank.py). At step 0
it computes the stock 2-expert model; after training the package is an ordinary expert whose FFN
delta has rank ≤ R (so `expert compress --rank R` is lossless), the public slices and everything
outside the owner's expert are bit-identical, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from flexmoe.lifecycle.expert import build_two_expert, train_expert
from flexmoe.model.lowrank import LowRankOwner, low_rank_owner, materialize
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.package import load_tensors, read_manifest, verify_package


def _two_expert(anchor_dir):
    anchor, _, extras = load_anchor(anchor_dir)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(anchor.config.num_hidden_layers, anchor.config.hidden_size, generator=g)
    return anchor, build_two_expert(anchor, extras, rows * 0.1, "domain")


def test_low_rank_owner_computes_the_stock_model_and_materializes_exactly(anchor_dir):
    anchor, model = _two_expert(anchor_dir)
    ids = torch.randint(0, anchor.config.vocab_size, (2, 24), generator=torch.Generator())
    with torch.no_grad():
        stock = model(ids).logits
        low_rank_owner(model, rank=3, owner=1, seed=0)
        assert all(isinstance(layer.mlp.experts, LowRankOwner) for layer in model.model.layers)
        assert torch.allclose(model(ids).logits, stock, atol=1e-5)  # B = 0: the anchor's FFN
        g = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            for b in (layer.mlp.experts.gate_up_b, layer.mlp.experts.down_b):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
        low = model(ids).logits
        assert not torch.allclose(low, stock, atol=1e-3)
        materialize(model)
        assert not any(isinstance(layer.mlp.experts, LowRankOwner) for layer in model.model.layers)
        assert torch.allclose(model(ids).logits, low, atol=1e-4)
    for layer, ref in zip(model.model.layers, anchor.model.layers, strict=True):
        e = layer.mlp.experts
        public_gu = torch.cat([ref.mlp.gate_proj.weight, ref.mlp.up_proj.weight])
        assert torch.equal(e.gate_up_proj[0], public_gu)  # the public slice never moved
        assert torch.equal(e.down_proj[0], ref.mlp.down_proj.weight)
        delta = (e.gate_up_proj[1] - public_gu).detach().double()
        assert torch.linalg.matrix_rank(delta, rtol=1e-5) <= 3


@pytest.fixture(scope="module")
def trained(work, anchor_dir, shards):
    kw = dict(
        public=shards["public/train"], steps=6, batch_size=4, seq_len=32, warmup=1,
        router_docs=4, seed=3, lr=1e-2, rank=4,
    )  # fmt: skip
    full = train_expert(anchor_dir, shards["code/train"], work / "lr-full", "code", **kw)
    return full, kw


def test_low_rank_package_has_the_rank_and_compresses_losslessly(work, anchor_dir, trained, capsys):
    full, _ = trained
    anchor, record, extras = load_anchor(anchor_dir)
    m, t = verify_package(work / "lr-full", record, extras, anchor)
    assert m.training.model_dump()["low_rank"]["rank"] == 4
    for i, layer in enumerate(anchor.model.layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            delta = t[f"layers.{i}.{proj}"].double() - getattr(layer.mlp, proj).weight.double()
            assert float(delta.abs().max()) > 0  # trained
            assert torch.linalg.matrix_rank(delta, rtol=1e-5) <= 4
    code, out, err = run_cli(
        ["expert", "compress", work / "lr-full", "--anchor", anchor_dir, "-o", work / "lr-r4"]
        + ["--rank", "4"],
        capsys,
    )
    assert code == 0, err
    assert read_manifest(work / "lr-r4").compression.energy > 1 - 1e-6
    assert not any(k.endswith("gate_proj") for k in load_tensors(work / "lr-r4"))


def test_low_rank_training_resumes_exactly(work, anchor_dir, shards, trained):
    full, kw = trained
    part = train_expert(
        anchor_dir, shards["code/train"], work / "lr-part", "code", ckpt_every=3, stop_after=4,
        **kw,
    )  # fmt: skip
    assert part.get("stopped")
    resumed = train_expert(
        anchor_dir, shards["code/train"], work / "lr-part", "code", ckpt_every=3, resume=True,
        **kw,
    )  # fmt: skip
    assert resumed["tensors"] == full["tensors"]
    # once the package is written its checkpoints go (they could only resume a finished run)
    for run in ("lr-full", "lr-part"):
        assert not (work / f"{run}.train" / "checkpoints").exists()
        assert (work / f"{run}.train" / "metrics.jsonl").is_file()


def test_rank_refusals(work, anchor_dir, shards, capsys):
    base = ["expert", "train", "--anchor", anchor_dir, "--data", shards["code/train"]]
    base += ["--name", "code", "--steps", 2, "--recipe", "paper"]
    for extra, needle in (
        (["--rank", 0, "-o", work / "lr-bad0"], "--rank"),
        (["--rank", 4, "--dp-epsilon", 8, "-o", work / "lr-bad1"], "--rank"),
    ):
        code, _, err = run_cli(base + extra, capsys)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code != 0 and len(lines) == 1 and needle in lines[0], err
        assert not extra[-1].exists()
