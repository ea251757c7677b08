"""Privacy a data owner can check: DP-SGD experts (Opacus) and the memorisation audit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import random_package, run_cli
from flexmoe.data.shards import TokenStream
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.evaluation.audit import Audited, audit, split_documents, train_control
from flexmoe.selection import expert_mask
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.merged import load_merged, load_model
from flexmoe.store.package import MANIFEST


def test_dp_module_computes_the_flexolmo_block(anchor_dir):
    from flexmoe.lifecycle.dp import to_dp_model
    from flexmoe.lifecycle.expert import build_two_expert

    anchor, _, extras = load_anchor(anchor_dir)
    L, H = anchor.config.num_hidden_layers, anchor.config.hidden_size
    model = build_two_expert(anchor, extras, torch.randn(L, H) * 0.3, "domain")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj[1].add_(
                0.05 * torch.randn_like(layer.mlp.experts.gate_up_proj[1])
            )
            layer.mlp.gate.bias[1] = -0.7
    ids = torch.randint(0, anchor.config.vocab_size, (2, 24))
    dp = copy.deepcopy(model)
    to_dp_model(dp)
    assert (dp(ids).logits - model(ids).logits).abs().max() < 1e-5
    assert {n for n, p in dp.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.mlp.{m}"
        for i in range(L)
        for m in ("gate.weight", "up.weight", "down.weight", "router.weight", "router.bias")
    }


@pytest.fixture(scope="module")
def dp_pkg(work, anchor_dir, shards):
    from flexmoe.lifecycle.expert import train_expert

    out = work / "dp-pkg"
    train_expert(
        anchor_dir,
        shards["code/train"],
        out,
        "dpcode",
        heldout=shards["code/heldout"],
        dp={"epsilon": 8.0, "max_grad_norm": 1.0, "epochs": 1},
        batch_size=8,
        seq_len=32,
        router_docs=8,
    )
    return out


def test_dp_training_records_epsilon_and_merge_enforces_it(work, anchor_dir, dp_pkg, capsys):
    m = json.loads((dp_pkg / MANIFEST).read_text())
    dp = m["training"]["dp"]
    assert 0 < dp["epsilon"] <= 8.0 + 1e-6 and dp["accountant"] == "opacus rdp"
    assert dp["noise_multiplier"] > 0 and dp["sampling"] == "Poisson" and dp["steps"] > 0
    assert "domain_embedding" not in m["tensors"]  # nothing from owner data outside DP-SGD
    code, out, err = run_cli(["expert", "verify", dp_pkg, "--anchor", anchor_dir], capsys)
    assert code == 0 and "DP-SGD: ε = " in out, err
    plain = random_package(work / "dp-plain", anchor_dir, "plain", 3)
    base = ["merge", "--anchor", anchor_dir]
    code, _, err = run_cli(
        [*base, "--experts", dp_pkg, "--max-epsilon", "1", "-o", work / "dp-m1"], capsys
    )
    assert code == 2 and "> --max-epsilon 1" in err and not (work / "dp-m1").exists()
    code, _, err = run_cli(
        [*base, "--experts", plain, "--max-epsilon", "8", "-o", work / "dp-m2"], capsys
    )
    assert code == 2 and "not trained with DP" in err
    code, _, err = run_cli(
        [*base, "--experts", dp_pkg, "--max-epsilon", "8", "-o", work / "dp-m3"], capsys
    )
    assert code == 0, err


@pytest.fixture(scope="module")
def control(work, anchor_dir, shards):
    return train_control(anchor_dir, shards["code/train"], work / "control", docs=4, steps=1000)


def test_audit_detects_the_overfit_control_and_not_the_anchor(anchor_dir, shards, control):
    model_dir, members = control
    tok = load_tokenizer(anchor_dir)
    non = split_documents(TokenStream(shards["code/heldout"]))
    anchor = Audited("anchor", load_model(anchor_dir))
    res = audit(
        [anchor, Audited("control", load_model(model_dir))],
        tok,
        members,
        non,
        anchor,
        n_docs=4,
        seq_len=64,
    )
    assert res["control"]["extraction"]["rate"] >= 0.5, res["control"]
    assert res["anchor"]["extraction"]["rate"] == 0.0
    assert res["control"]["mia"]["loss"]["auc"] >= 0.9
    assert res["control"]["member_loss"] < res["anchor"]["member_loss"]


def test_mia_is_chance_for_a_model_that_never_saw_the_data(anchor_dir, shards):
    """The anchor never saw code: members (code train) vs non-members (code held-out) ≈ 0.5."""
    tok = load_tokenizer(anchor_dir)
    mem = split_documents(TokenStream(shards["code/train"]))
    non = split_documents(TokenStream(shards["code/heldout"]))
    res = audit([Audited("anchor", load_model(anchor_dir))], tok, mem, non, None, n_docs=10)
    auc = res["anchor"]["mia"]["loss"]
    assert auc["ci95"][0] <= 0.5 <= auc["ci95"][1], auc


def test_excluding_the_expert_gives_the_anchors_audit_exactly(work, anchor_dir, shards, control):
    from flexmoe.lifecycle.merge import merge

    _, members = control
    pkg = random_package(work / "audit-pkg", anchor_dir, "owner", 11)
    merge(anchor_dir, [pkg], work / "audit-merged", log=None, preselect=0)
    tok = load_tokenizer(anchor_dir)
    non = split_documents(TokenStream(shards["code/heldout"]))
    merged = load_merged(work / "audit-merged")
    excluded = Audited("excluded", merged, expert_mask(merged, exclude=["owner"]))
    anchor = Audited("anchor", load_model(anchor_dir))
    res = audit(
        [excluded, anchor, Audited("with", merged)],
        tok,
        members,
        non,
        anchor,
        n_docs=4,
        seq_len=64,
    )
    assert res["excluded"]["extraction"] == res["anchor"]["extraction"]
    assert res["excluded"]["mia"] == res["anchor"]["mia"]
    assert res["excluded"]["member_loss"] == pytest.approx(res["anchor"]["member_loss"], abs=1e-6)
    assert res["with"]["member_loss"] != pytest.approx(res["anchor"]["member_loss"], abs=1e-3)


def test_audit_cli(anchor_dir, shards, control, work, capsys):
    code, out, err = run_cli(
        ["audit", shards["code/train"], "--model", anchor_dir, "--heldout", shards["code/heldout"]]
        + ["--reference", anchor_dir, "--docs", "4", "--json", work / "audit.json"],
        capsys,
    )
    assert code == 0, err
    assert "memorisation audit" in out and json.loads((work / "audit.json").read_text())
