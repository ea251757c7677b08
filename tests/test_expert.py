"""Expert training against the frozen anchor, and expert packages as untrusted input."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from flexmoe.lifecycle.expert import build_two_expert, freeze_for_expert, train_expert
from flexmoe.model.router import routers
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.fsutil import FILES_RECORD
from flexmoe.store.model_card import CARD
from flexmoe.store.package import MANIFEST, WEIGHTS, read_manifest, verify_package


@pytest.fixture(scope="module")
def expert_pkg(work, anchor_dir, shards):
    out = work / "expert-code"
    train_expert(
        anchor_dir,
        shards["code/train"],
        out,
        "code",
        heldout=shards["code/heldout"],
        public=shards["public/train"],
        steps=25,
        batch_size=8,
        seq_len=64,
        lr=3e-3,
        warmup=2,
        router_docs=8,
        owner="PSF",
        licence="PSF-2.0",
        allowed_uses=["research"],
    )
    return out


def test_untrained_two_expert_equals_anchor(anchor_dir):
    anchor, _, extras = load_anchor(anchor_dir)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(anchor.config.num_hidden_layers, anchor.config.hidden_size, generator=g)
    model = build_two_expert(anchor, extras, rows, "domain")
    ids = torch.randint(0, anchor.config.vocab_size, (2, 48), generator=g)
    with torch.no_grad():
        ref = anchor(ids).logits
        diff = (model(ids).logits - ref).abs().max().item()
    # p·M(x) + (1−p)·M(x) = M(x) up to fp32 rounding: 2e-6 per unit of logit scale
    assert diff <= 2e-6 * max(1.0, ref.abs().max().item())


def test_frozen_tensors_bit_identical_after_training(work, anchor_dir, shards):
    """Train in-process, with weight decay, and compare every frozen tensor (and frozen slice)
    to the anchor. The optimizer holds only the owner's rows (owner-only parameters)."""
    from flexmoe.train.loop import TrainConfig, train

    anchor, _, extras = load_anchor(anchor_dir)
    ref = {k: v.clone() for k, v in anchor.state_dict().items()}
    L, H = anchor.config.num_hidden_layers, anchor.config.hidden_size
    model = build_two_expert(anchor, extras, torch.randn(L, H) * 0.1, "domain")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = freeze_for_expert(model)
    from flexmoe.data.shards import TokenStream
    from flexmoe.lifecycle.expert import project_bias
    from flexmoe.model.freezing import merge_owner_params

    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    owner_ffn = 3 * anchor.config.intermediate_size * H
    assert sum(v for n, v in trainable.items() if ".mlp.experts." in n) == L * owner_ffn
    train(
        model,
        TokenStream(shards["code/train"]),
        TrainConfig(steps=8, batch_size=4, seq_len=64, lr=1e-2, weight_decay=0.1),
        work / "freeze-run",
        grad_masks=masks,
        post_step=project_bias,
    )
    merge_owner_params(model)
    after = model.state_dict()
    changed = set()
    for k, v in after.items():
        if ".mlp.experts." in k or ".mlp.gate." in k:
            assert torch.equal(v[0], before[k][0]), f"public slice of {k} changed"
            if not torch.equal(v[1], before[k][1]):
                changed.add(k)
        else:
            assert torch.equal(v, before[k]), f"frozen {k} changed"
            if k in ref:
                assert torch.equal(v, ref[k])
    assert any("experts.gate_up_proj" in k for k in changed)
    assert any("gate.weight" in k for k in changed)
    for r in routers(model):
        assert r.bias[0] == 0 and r.bias[1] <= 0


def test_bias_constraint_holds_even_when_pushed_up(anchor_dir):
    """The forward clamps b ≤ 0, and the post-step projection keeps stored values ≤ 0."""
    from flexmoe.lifecycle.expert import project_bias

    anchor, _, extras = load_anchor(anchor_dir)
    L, H = anchor.config.num_hidden_layers, anchor.config.hidden_size
    model = build_two_expert(anchor, extras, torch.randn(L, H), "domain")
    ids = torch.randint(0, 512, (1, 16))
    base = model(ids).logits
    for r in routers(model):
        r.bias.data.fill_(5.0)
    assert torch.equal(model(ids).logits, base)  # +5 acts as 0
    project_bias(model)
    assert all((r.bias <= 0).all() for r in routers(model))


def test_expert_beats_anchor_on_its_domain_and_package_contents(expert_pkg, anchor_dir):
    m = read_manifest(expert_pkg)
    assert m.training.heldout_bpb < m.training.anchor_heldout_bpb
    assert m.consent.allowed_uses == ["research"] and m.owner == "PSF"
    tensors = load_file(expert_pkg / WEIGHTS)
    L = json.loads((anchor_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(tensors) == 5 * L + 3 and tensors["domain_embedding"].shape == (384,)
    protos = tensors["domain_prototypes"]
    assert protos.shape == (8, 384) and torch.allclose(protos.norm(dim=-1), torch.ones(8))
    assert "k-means" in m.training.model_dump()["domain_prototypes"]
    H = json.loads((anchor_dir / "config.json").read_text())["hidden_size"]
    assert tensors["hidden_centroid"].shape == (H,) and 0 < tensors["hidden_centroid"].norm() <= 1
    assert "layer-" in m.training.model_dump()["hidden_centroid"]
    shared = ("embed_tokens", "attn", "lm_head", "norm")
    assert not any(s in k for k in tensors for s in shared)
    assert all(float(tensors[f"layers.{i}.bias"]) <= 0 for i in range(L))
    files = sorted(p.name for p in expert_pkg.iterdir())
    # weights, manifest, the model card, and the record of what flexmoe wrote
    assert files == sorted([WEIGHTS, MANIFEST, CARD, FILES_RECORD])


def test_verify_accepts_good_package(expert_pkg, anchor_dir, capsys):
    code, out, err = run_cli(["expert", "verify", expert_pkg, "--anchor", anchor_dir], capsys)
    assert code == 0 and "ok" in out, err


def _tamper(src, dst, problem, other_anchor_fp=None):
    shutil.copytree(src, dst)
    mpath, wpath = dst / MANIFEST, dst / WEIGHTS
    manifest = json.loads(mpath.read_text())
    tensors = {k: v.clone() for k, v in load_file(wpath).items()}
    if problem == "tampered":
        tensors["layers.0.down_proj"][0, 0] += 1e-4
        save_file(tensors, wpath)
    elif problem == "shape":
        tensors["layers.0.router"] = torch.zeros(3)
        manifest["tensors"]["layers.0.router"]["shape"] = [3]
        save_file(tensors, wpath)
    elif problem == "nan":
        from flexmoe.store.package import tensor_sha256

        tensors["layers.1.up_proj"][0, 0] = float("nan")
        manifest["tensors"]["layers.1.up_proj"]["sha256"] = tensor_sha256(
            tensors["layers.1.up_proj"]
        )
        save_file(tensors, wpath)
    elif problem == "anchor":
        manifest["anchor_fingerprint"] = "0" * 64
    elif problem == "field":
        del manifest["owner"]
    elif problem == "pickle":
        with open(wpath, "wb") as f:
            pickle.dump({k: v.numpy() for k, v in tensors.items()}, f)
    elif problem == "positive-bias":
        from flexmoe.store.package import tensor_sha256

        tensors["layers.0.bias"] = torch.tensor(0.5)
        manifest["tensors"]["layers.0.bias"]["sha256"] = tensor_sha256(tensors["layers.0.bias"])
        save_file(tensors, wpath)
    elif problem == "extra":
        tensors["embed_tokens"] = torch.zeros(2, 2)
        save_file(tensors, wpath)
    mpath.write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize(
    "problem, expect",
    [
        ("tampered", "does not match its sha256"),
        ("shape", "has shape [3]"),
        ("nan", "non-finite"),
        ("anchor", "not this anchor"),
        ("field", "field 'owner' is missing"),
        ("pickle", "not a valid safetensors file"),
        ("positive-bias", "bias must be ≤ 0"),
        ("extra", "unexpected tensor 'embed_tokens'"),
    ],
)
def test_verify_rejects(work, expert_pkg, anchor_dir, capsys, problem, expect):
    bad = _tamper(expert_pkg, work / f"pkg-{problem}", problem)
    code, out, err = run_cli(["expert", "verify", bad, "--anchor", anchor_dir], capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and expect in lines[0], err


def test_verify_is_the_library_check(expert_pkg, anchor_dir):
    anchor, rec, extras = load_anchor(anchor_dir)
    m, tensors = verify_package(expert_pkg, rec, extras, anchor.config)
    assert m.name == "code" and len(tensors) == len(m.tensors)


def test_dense_expert_baseline(work, anchor_dir, shards):
    out = work / "dense-code"
    rec = train_expert(
        anchor_dir,
        shards["code/train"],
        out,
        "code",
        dense=True,
        heldout=shards["code/heldout"],
        steps=10,
        batch_size=8,
        seq_len=64,
    )
    assert rec["kind"] == "dense-expert"
    dense, _, _ = load_anchor(out)
    anchor, arec, _ = load_anchor(anchor_dir)
    assert rec["anchor_fingerprint"] == arec["fingerprint"]
    assert any(
        not torch.equal(a, b)
        for a, b in zip(dense.state_dict().values(), anchor.state_dict().values(), strict=True)
    )


def test_no_bias_ablation_keeps_bias_zero(anchor_dir):
    anchor, _, extras = load_anchor(anchor_dir)
    L, H = anchor.config.num_hidden_layers, anchor.config.hidden_size
    model = build_two_expert(anchor, extras, torch.randn(L, H), "domain")
    masks = freeze_for_expert(model, train_bias=False)
    assert all(not m.any() for k, m in masks.items() if k.endswith("gate.bias"))


def test_eval_bpb_optout_of_only_expert_equals_anchor(work, expert_pkg, anchor_dir, shards, capsys):
    """Merged = public + code. Excluding code must score exactly like the anchor; keeping it
    must help on code."""
    from flexmoe.evaluation.heldout import bpb_table
    from flexmoe.lifecycle.merge import merge

    merged = work / "merged-code"
    merge(anchor_dir, [expert_pkg], merged, log=None)
    root = shards["code/heldout"].parent.parent
    kw = dict(max_tokens=4096, seq_len=64, unigram=False)
    anchor_rows, _ = bpb_table(anchor_dir, root, **kw)
    out_rows, notes = bpb_table(merged, root, exclude=["code"], **kw)
    full_rows, _ = bpb_table(merged, root, **kw)
    assert notes and "active experts: public" in notes[0] and "code" not in notes[0]
    for a, o in zip(anchor_rows, out_rows, strict=True):
        assert o["bpb"] == pytest.approx(a["bpb"], abs=1e-6)
    code = {r["domain"]: r["bpb"] for r in full_rows}["code"]
    assert code < {r["domain"]: r["bpb"] for r in anchor_rows}["code"]
    code_cli, stdout, err = run_cli(
        [
            "eval",
            "bpb",
            "--model",
            merged,
            "--data",
            root,
            "--exclude",
            "code",
            "--max-tokens",
            4096,
            "--seq-len",
            64,
        ],
        capsys,
    )
    assert code_cli == 0 and "public" in stdout, err


def test_public_negatives_skip_ffn_gradients_exactly(anchor_dir, shards):
    """The public-negative pass computes no FFN weight gradients, and the router gradients are
    bit-identical to computing them and dropping them (the FSDP path)."""
    from contextlib import nullcontext
    from unittest import mock

    from flexmoe.data.shards import TokenStream
    from flexmoe.lifecycle import gate

    anchor, _, extras = load_anchor(anchor_dir)
    L, H = anchor.config.num_hidden_layers, anchor.config.hidden_size
    rows = torch.randn(L, H, generator=torch.Generator().manual_seed(0)) * 0.1
    hook = gate.PublicNegatives(TokenStream(shards["public/train"]), 3, 32, seed=0, gate_weight=1.0)

    def grads(skip: bool) -> dict[str, torch.Tensor]:
        model = build_two_expert(anchor, extras, rows, "domain")
        freeze_for_expert(model)
        with mock.patch.object(gate.PublicNegatives, "skip_ffn_grads", skip):
            hook(model, step=3, autocast=nullcontext())
        assert all(p.requires_grad for n, p in model.named_parameters() if ".mlp.experts." in n)
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fast, full = grads(True), grads(False)
    assert fast.keys() == full.keys()
    for n in fast:
        if ".mlp.experts." in n:
            assert fast[n] is None and full[n] is None
        else:
            assert torch.equal(fast[n], full[n]), n
