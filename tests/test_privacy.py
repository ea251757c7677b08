"""Privacy a data owner can check: DP-SGD experts (Opacus) and the memorisation audit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import random_package, run_cli
from flexmoe.data.shards import TokenStream
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.evaluation.audit import (
    Audited,
    audit,
    random_windows,
    split_documents,
    train_control,
    training_windows,
)
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


def test_dp_step_clips_each_documents_gradient(anchor_dir):
    """Ghost clipping (two backward passes, per-document norms only) = clipping each document's
    gradient by hand: with the noise off, one SGD step moves the weights by the mean of the
    clipped per-document gradients of the masked mean loss."""
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from flexmoe.lifecycle.dp import IGNORE, dp_step, to_dp_model
    from flexmoe.lifecycle.expert import build_two_expert

    torch.manual_seed(0)
    anchor, _, extras = load_anchor(anchor_dir)
    L, H, V = (anchor.config.num_hidden_layers, anchor.config.hidden_size, anchor.config.vocab_size)
    model = build_two_expert(anchor, extras, torch.randn(L, H) * 0.3, "domain")
    to_dp_model(model)
    ref = copy.deepcopy(model)
    x = torch.randint(0, V, (4, 17))
    m = torch.ones(4, 16, dtype=torch.bool)
    m[1, 9:] = False  # a short document: its padding is not scored
    m[3, 3:] = False
    clip = 0.05
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    want = {n: torch.zeros_like(p) for n, p in ref.named_parameters() if p.requires_grad}
    norms = []
    for i in range(4):
        ref.zero_grad()
        logits = ref(x[i : i + 1, :-1]).logits[0]
        nll = torch.nn.functional.cross_entropy(logits.float(), x[i, 1:], reduction="none")
        ((nll * m[i]).sum() / m[i].sum()).backward()
        g = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
        norm = torch.sqrt(sum((v.double() ** 2).sum() for v in g.values()))
        norms.append(float(norm))
        for n in names:
            want[n] += g[n] * min(1.0, clip / (float(norm) + 1e-6)) / 4
    assert min(norms) > clip  # every document is clipped: the test can tell
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(TensorDataset(x, m), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dpm, opt, crit, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=torch.optim.SGD(params, lr=1.0),
            criterion=torch.nn.CrossEntropyLoss(ignore_index=IGNORE),
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=clip,
            poisson_sampling=False,
            grad_sample_mode="ghost",
        )
    dp_step(dpm, opt, crit, x, m)
    for n, p in model.named_parameters():
        if p.requires_grad:
            step = before[n] - p.detach()
            assert torch.allclose(step, want[n], atol=1e-7, rtol=1e-3), n
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert dp_step(dpm, opt, crit, x[:0], m[:0]) == 0.0  # Poisson drew nothing: noise only (0)
    assert all(torch.equal(p, after[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_dp_training_in_physical_batches_equals_whole_batches(anchor_dir, shards):
    """Splitting each Poisson batch into smaller forward passes (to bound memory on a real
    anchor) changes neither the update nor the privacy record."""
    from flexmoe.lifecycle.dp import to_dp_model, train_dp
    from flexmoe.lifecycle.expert import build_two_expert

    anchor, _, extras = load_anchor(anchor_dir)
    L, H = anchor.config.num_hidden_layers, anchor.config.hidden_size
    base = build_two_expert(anchor, extras, torch.randn(L, H) * 0.3, "domain")
    stream = TokenStream(shards["code/train"])
    runs = []
    for physical in (64, 3):
        model = copy.deepcopy(base)
        rec = train_dp(
            model, stream, epsilon=8.0, delta=None, max_grad_norm=0.5, epochs=1,
            batch_size=8, seq_len=32, lr=1e-3, seed=0, pad=0, physical_batch=physical,
        )  # fmt: skip
        runs.append((rec, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (a, wa), (b, wb) = runs
    assert a["steps"] == b["steps"] > 1 and a["epsilon"] == b["epsilon"]
    assert a["mean_train_loss"] == pytest.approx(b["mean_train_loss"], rel=1e-5)
    init = copy.deepcopy(base)
    to_dp_model(init)
    w0 = {n: p.detach() for n, p in init.named_parameters()}
    moved = max(float((wa[n] - w0[n]).abs().max()) for n in w0)
    assert moved > 1e-4  # training did something
    for n in wa:
        assert torch.allclose(wa[n], wb[n], atol=1e-6, rtol=1e-4), n


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
    assert "hidden_centroid" not in m["tensors"]
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
    # the same test on unseen documents: what the control gives back is what it memorised
    non_rate = res["control"]["extraction_non_members"]
    assert non_rate["documents"] == 4 and non_rate["rate"] < res["control"]["extraction"]["rate"]
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
    assert res["excluded"]["extraction_non_members"] == res["anchor"]["extraction_non_members"]
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


def test_training_windows_are_what_training_read(work, anchor_dir, shards, monkeypatch):
    """The audit's members for a non-DP model are rebuilt from its recorded hyperparameters; they
    must be exactly the windows the training loop read (at a small budget, few documents)."""
    import numpy as np

    import flexmoe.train.loop as loop
    from flexmoe.lifecycle.expert import train_expert

    read, real = [], loop.get_batch

    def recording(stream, cfg, step, micro):
        b = real(stream, cfg, step, micro)
        read.extend(r.numpy() for r in b)
        return b

    monkeypatch.setattr(loop, "get_batch", recording)
    out = work / "dense-windows"
    train_expert(
        anchor_dir, shards["code/train"], out, "code", dense=True, steps=3, batch_size=4,
        seq_len=32, grad_accum=2, seed=5, overwrite=True,
    )  # fmt: skip
    cfg = json.loads((out / "flexmoe_anchor.json").read_text())["training"]["config"]
    stream = TokenStream(shards["code/train"])
    rebuilt = training_windows(stream, cfg)
    assert len(rebuilt) == len(read) == 12
    assert all(np.array_equal(a, b) for a, b in zip(rebuilt, read, strict=True))
    other = training_windows(stream, cfg | {"seed": 6})
    assert not all(np.array_equal(a, b) for a, b in zip(other, read, strict=True))
    non = random_windows(TokenStream(shards["code/heldout"]), 12, 33, seed=0)
    assert len(non) == 12 and all(len(w) == 33 for w in non)


def test_audit_trained_by_rebuilds_what_the_package_read(work, anchor_dir, shards, dp_pkg, capsys):
    """`audit --trained-by PKG`: members are the windows the package's seeded training read from
    DATA (checked against the manifest's fingerprint of its training data), or DP-SGD's document
    prefixes; other data, or a package without the fingerprint, is refused with nothing written."""
    import shutil

    from flexmoe.data.shards import shards_sha256
    from flexmoe.lifecycle.expert import train_expert

    pkg = work / "trained-by"
    train_expert(
        anchor_dir, shards["code/train"], pkg, "code", recipe="paper", steps=3, batch_size=4,
        seq_len=32, seed=5, router_docs=8, overwrite=True,
    )  # fmt: skip
    manifest = json.loads((pkg / MANIFEST).read_text())
    assert manifest["training"]["data_sha256"] == shards_sha256(shards["code/train"])
    held = shards["code/heldout"]
    base = ["audit", shards["code/train"], "--model", anchor_dir, "--heldout", held, "--docs", "4"]
    code, out, err = run_cli([*base, "--trained-by", pkg, "--json", work / "tb.json"], capsys)
    assert code == 0, err
    got = json.loads((work / "tb.json").read_text())
    assert got["members"] == "12 training windows of 33 tokens" and "training windows" in out
    mem = training_windows(
        TokenStream(shards["code/train"]), manifest["training"]["hyperparameters"]
    )
    non = random_windows(TokenStream(held), 12, 33, seed=0)
    tok = load_tokenizer(anchor_dir)
    direct = audit([Audited(str(anchor_dir), load_model(anchor_dir))], tok, mem, non, None, 4)
    row = got["models"][str(anchor_dir)]
    assert row["member_loss"] == pytest.approx(direct[str(anchor_dir)]["member_loss"], abs=1e-6)
    assert row["mia"]["loss"]["auc"] == pytest.approx(direct[str(anchor_dir)]["mia"]["loss"]["auc"])

    code, _, err = run_cli([*base, "--trained-by", dp_pkg, "--json", work / "tb-dp.json"], capsys)
    assert code == 0, err
    assert json.loads((work / "tb-dp.json").read_text())["members"].startswith(
        "documents' first 33"
    )

    bad = ["audit", shards["public/train"], *base[2:], "--trained-by", pkg, "--json", work / "x"]
    code, _, err = run_cli(bad, capsys)
    assert code == 2 and "not the data the package was trained on" in err
    assert len(err.strip().splitlines()) == 1 and not (work / "x").exists()
    old = work / "trained-by-old"
    shutil.copytree(pkg, old, dirs_exist_ok=True)
    del manifest["training"]["data_sha256"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    code, _, err = run_cli([*base, "--trained-by", old, "--json", work / "x"], capsys)
    assert code == 2 and "no fingerprint of its training data" in err and not (work / "x").exists()
    manifest["training"]["data_sha256"] = "0" * 64  # the format before "tokens-v1:"
    (old / MANIFEST).write_text(json.dumps(manifest))
    code, _, err = run_cli([*base, "--trained-by", old, "--json", work / "x"], capsys)
    assert code == 2 and "older format" in err and not (work / "x").exists()
