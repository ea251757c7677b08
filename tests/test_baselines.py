"""Model soup, BTM, data mixing and the ablation helpers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexmoe.data.shards import TokenStream
from flexmoe.lifecycle.baselines import BTMEnsemble, soup
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.merged import experts_of


def test_soup_of_identical_models_is_the_model(anchor_dir):
    a, _, _ = load_anchor(anchor_dir)
    s = soup([a, a, a], weights=[0.2, 0.3, 0.5])
    ids = torch.randint(0, 512, (2, 16))
    assert torch.allclose(s(ids).logits, a(ids).logits, atol=1e-5)


def test_soup_is_the_parameter_average(anchor_dir):
    a, _, _ = load_anchor(anchor_dir)
    b, _, _ = load_anchor(anchor_dir)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    s = soup([a, b], weights=[3, 1])
    k = "model.layers.0.mlp.up_proj.weight"
    expect = 0.75 * a.state_dict()[k] + 0.25 * b.state_dict()[k]
    assert torch.allclose(s.state_dict()[k], expect, atol=1e-6)


@torch.no_grad()
def test_btm_single_model_and_causality(anchor_dir):
    a, _, _ = load_anchor(anchor_dir)
    b, _, _ = load_anchor(anchor_dir)
    for p in b.parameters():
        p.mul_(0.9)
    ids = torch.randint(0, 512, (2, 24))
    one = BTMEnsemble([a], top_k=2)(ids)
    assert torch.allclose(one, F.log_softmax(a(ids).logits, -1), atol=1e-5)
    ens = BTMEnsemble([a, b], top_k=2)
    out = ens(ids)
    assert torch.allclose(out.exp().sum(-1), torch.ones(2, 24), atol=1e-4)
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 7) % 512  # future tokens must not affect the past
    assert torch.allclose(ens(changed)[:, :15], out[:, :15], atol=1e-6)
    # rows one at a time (bounded memory) = the whole batch at once
    assert torch.allclose(ens(ids, max_elems=1), out, atol=1e-6)
    # = the mixture written out: log Σ_m w_m p_m, w from the same prefix scores
    lp = torch.stack([F.log_softmax(m(ids).logits, -1) for m in (a, b)])
    nll = -lp[:, :, :-1].gather(-1, ids[None, :, 1:, None].expand(2, -1, -1, 1))[..., 0]
    cum = torch.cat([torch.zeros_like(nll[:, :, :1]), nll.cumsum(-1)], -1)
    w = torch.softmax(-(cum / torch.arange(24).clamp(min=1)) / 0.1, dim=0)
    assert torch.allclose(out, torch.logsumexp(lp + torch.log(w)[..., None], 0), atol=1e-5)


def test_token_stream_concat(shards):
    a, b = TokenStream(shards["public/heldout"]), TokenStream(shards["code/heldout"])
    c = TokenStream.concat([shards["public/heldout"], shards["code/heldout"]])
    assert len(c) == len(a) + len(b)
    assert np.array_equal(
        c.window(len(a) - 5, 10), np.concatenate([a.window(len(a) - 5, 5), b.window(0, 5)])
    )


@pytest.mark.slow
def test_demo_smoke_end_to_end(tmp_path):
    """The whole pipeline with tiny models: every stage runs and the report is written."""
    out = tmp_path / "run"
    cmd = [sys.executable, "scripts/demo.py", "--smoke", "--ablations", "--rt", "--out", str(out)]
    cmd += ["--tasks", "--task-limit", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report" / "report.md").read_text()
    assert "Main table" in report and "Opt-out" in report and "Router tuning" in report
    assert "Selective experts: recipes side by side" in report
    for png in ("optout.png", "routing.png", "topk.png", "main.png", "curves.png"):
        assert (out / "report" / png).is_file()
    assert "| control: anchor continued on public |" in report
    assert "| FlexOlmo merged, public expert = control |" in report
    assert "The owners' experts add to the public-continued control" in report
    assert "Per source" in report
    assert "math.flexmix-mathgen" in report and "Top-k renormalisation" in report
    tasks = (out / "report" / "tasks.md").read_text()
    assert "| merged without code |" in tasks and "| model soup (uniform) |" in tasks
    assert "## Claims on tasks" in tasks and "## Opt-out" in tasks  # paired, per document
    presel = (out / "report" / "preselect.md").read_text()
    assert "## 64 tokens" in presel and "| router |" in presel
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "▶" not in again.stderr  # every stage, the evaluation included, was reused
    assert "FlexOlmo merged" in again.stdout
    # an evaluation that stopped before its report resumes from the rows it had scored
    first = json.loads((out / "report" / "results.json").read_text())
    kept = {p: p.stat().st_mtime_ns for p in (out / "eval-cache").rglob("*.json")}
    assert kept
    (out / ".report.json").unlink()
    shutil.rmtree(out / "report")
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # reused, not scored again
    assert json.loads((out / "report" / "results.json").read_text())["windows"] == first["windows"]


def test_demo_evaluation_is_redone_when_a_stage_or_setting_changes(tmp_path):
    from flexmoe.demo.config import DemoConfig
    from flexmoe.demo.pipeline import _eval_spec
    from flexmoe.store.fsutil import write_json

    cfg = DemoConfig(out=tmp_path)
    (tmp_path / "experts").mkdir()
    write_json(tmp_path / ".anchor.json", {"spec_hash": "a"})
    write_json(tmp_path / "experts" / ".code.json", {"spec_hash": "b"})
    spec = _eval_spec(cfg)
    write_json(tmp_path / ".report.json", {"spec_hash": "r"})
    write_json(tmp_path / ".preselect.json", {"spec_hash": "p"})
    assert _eval_spec(cfg) == spec  # the evaluation's own record and later stages' do not count
    write_json(tmp_path / "experts" / ".code.json", {"spec_hash": "c"})
    assert _eval_spec(cfg) != spec
    spec = _eval_spec(cfg)
    cfg.eval_tokens *= 2
    assert _eval_spec(cfg) != spec


def test_results_parts_add_tasks_without_redoing_the_evaluation():
    """Parts 3 and 4 of `make results` only add downstream-task stages (bf16 like the held-out
    evaluation; the opt-out rows in part 4): the held-out evaluation of part 2 is reused."""
    from flexmoe.demo.config import DemoConfig
    from flexmoe.demo.pipeline import _eval_spec

    p2, p3, p4 = (DemoConfig.results(p) for p in (2, 3, 4))
    assert not p2.tasks and p3.tasks and p4.tasks
    assert not p3.task_optouts and p4.task_optouts and p3.eval_bf16
    assert _eval_spec(p2) == _eval_spec(p3) == _eval_spec(p4)


def test_unrestricted_moe_and_no_coordination_package(work, anchor_dir, shards):
    """The two ablation builders produce a loadable merged model and a verifiable package."""
    from flexmoe.lifecycle.baselines import package_from_dense, train_unrestricted
    from flexmoe.lifecycle.expert import train_expert
    from flexmoe.store.merged import load_merged
    from flexmoe.store.package import verify_package

    out = work / "unrestricted"
    train_unrestricted(
        anchor_dir,
        {"code": shards["code/train"]},
        out,
        router_docs=4,
        steps=3,
        batch_size=4,
        seq_len=32,
        warmup=1,
    )
    m = load_merged(out)
    assert experts_of(m).names == ["public", "code"] and m.config.num_experts == 2
    anchor, rec, extras = load_anchor(anchor_dir)
    changed = [
        k
        for k, v in m.state_dict().items()
        if k in anchor.state_dict() and not torch.equal(v, anchor.state_dict()[k])
    ]
    assert changed  # every parameter was free to train, shared ones included
    dense = work / "dense-for-nocoord"
    train_expert(
        anchor_dir,
        shards["code/train"],
        dense,
        "code",
        dense=True,
        steps=3,
        batch_size=4,
        seq_len=32,
    )
    pkg = work / "nocoord-code"
    package_from_dense(anchor_dir, dense, shards["code/train"], pkg, "code", router_docs=4)
    man, _ = verify_package(pkg, rec, extras, anchor.config)
    assert man.router_init == "domain"


def test_unrestricted_moe_resumes_where_it_stopped(work, anchor_dir, shards):
    """The results run's longest stage spans sessions: stopped after a checkpoint, the same call
    continues from it and writes what the uninterrupted run writes; the checkpoints go after."""
    from safetensors.torch import load_file

    from flexmoe.lifecycle.baselines import train_unrestricted

    kw = dict(router_docs=4, steps=4, batch_size=4, seq_len=32, warmup=1, ckpt_every=2)
    data = {"code": shards["code/train"]}
    whole, parts = work / "u-whole", work / "u-parts"
    assert train_unrestricted(anchor_dir, data, whole, **kw)["resumed_from_step"] == 0
    res = train_unrestricted(anchor_dir, data, parts, stop_after=3, **kw)
    assert res.get("stopped") and not parts.exists()  # nothing half-trained is written
    assert (work / "u-parts.train" / "checkpoints").is_dir()
    assert train_unrestricted(anchor_dir, data, parts, **kw)["resumed_from_step"] == 2
    a, b = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (work / "u-parts.train" / "checkpoints").exists()
    meta = json.loads((parts / "flexmoe_merged.json").read_text())
    assert "stop_after" not in meta["unrestricted"]["config"]


def test_unrestricted_moe_in_the_papers_form_pools_public_data(work, anchor_dir, shards):
    """The paper pools all data, the public split included, without adding an expert for it:
    the experts stay public + owners, the data differ, so the weights do."""
    from safetensors.torch import load_file

    from flexmoe.lifecycle.baselines import train_unrestricted
    from flexmoe.store.merged import load_merged

    kw = dict(router_docs=4, steps=2, batch_size=4, seq_len=32, warmup=1)
    data = {"code": shards["code/train"]}
    owners, everything = work / "u-owners", work / "u-all"
    train_unrestricted(anchor_dir, data, owners, **kw)
    train_unrestricted(anchor_dir, data, everything, pool={"public": shards["public/train"]}, **kw)
    assert experts_of(load_merged(everything)).names == ["public", "code"]
    meta = json.loads((everything / "flexmoe_merged.json").read_text())
    assert meta["unrestricted"]["pool"] == ["code", "public"]
    a, b = load_file(owners / "model.safetensors"), load_file(everything / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
