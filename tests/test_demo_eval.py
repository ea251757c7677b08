"""The demo evaluation's machinery: rows kept as they are scored (a long evaluation resumes), and
the merge with a public-continued control's FFN as its public expert."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ArrayStream, random_package


def test_scored_rows_are_kept_and_reused_by_key(tmp_path):
    from flexmoe.evaluation.demo_eval import EvalSettings, _bpb

    rng = np.random.default_rng(0)
    V = 16
    tb = np.array([0, *rng.integers(1, 4, V - 1)])
    streams = {
        "public": ArrayStream(rng.integers(0, V, 600)),
        "code": ArrayStream(rng.integers(0, V, 600)),
    }
    tables = [torch.randn(V, V, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    calls = []

    def fn_of(i):
        def fn(ids):
            calls.append(i)
            return tables[i][ids]

        return fn

    s = EvalSettings(
        domains=("code",),
        seq_len=32,
        eval_tokens=320,
        baselines=False,
        prompt="",
        cache_dir=str(tmp_path / "cache"),
    )
    first = _bpb(fn_of(0), streams, tb, s, key="anchor")
    assert calls and len(list((tmp_path / "cache").glob("*.json"))) == 2  # one file per domain
    calls.clear()
    again = _bpb(fn_of(1), streams, tb, s, key="anchor")  # the kept row, not model 1's
    assert not calls
    assert dict(again) == dict(first) and again.windows == first.windows
    other = _bpb(fn_of(1), streams, tb, s, key="soup")
    assert calls and other["code"] != first["code"]
    # a domain whose file is missing (an interrupted evaluation) is scored again, alone
    kept = {json.loads(p.read_text())["key"]: p for p in (tmp_path / "cache").glob("*.json")}
    kept["anchor|code"].unlink()
    calls.clear()
    resumed = _bpb(fn_of(0), streams, tb, s, key="anchor")
    assert len(calls) == 2 and dict(resumed) == dict(first)  # 2 batches of 8: code only
    # without a cache directory nothing is kept
    plain = EvalSettings(domains=("code",), seq_len=32, eval_tokens=320, baselines=False, prompt="")
    calls.clear()
    _bpb(fn_of(0), streams, tb, plain, key="anchor")
    assert len(calls) == 4


@pytest.fixture(scope="module")
def merged_model(work, anchor_dir):
    from flexmoe.lifecycle.merge import merge
    from flexmoe.store.merged import load_merged

    pkgs = [random_package(work / f"de-{n}", anchor_dir, n, seed=i) for i, n in enumerate("ab")]
    merge(anchor_dir, pkgs, work / "de-merged", log=None, preselect=0)
    return load_merged(work / "de-merged")


def test_public_ffn_swaps_the_public_expert_only_and_restores_it(anchor_dir, merged_model):
    from flexmoe.evaluation.demo_eval import public_ffn
    from flexmoe.model.arch import check_dense
    from flexmoe.store.anchor_dir import load_anchor

    m = merged_model
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = m(ids).logits.clone()
        anchor = load_anchor(anchor_dir)[0]
        with public_ffn(m, anchor):  # the anchor's own FFN: nothing changes
            assert torch.equal(m(ids).logits, before)
        control = load_anchor(anchor_dir)[0]
        for name, p in control.named_parameters():
            if ".mlp." in name:
                p.mul_(0.5)
            else:
                p.add_(1.0)  # attention etc. of the control are not taken
        keys = check_dense(control.config).keys
        sd, start = control.state_dict(), {k: v.clone() for k, v in m.state_dict().items()}
        with public_ffn(m, control):
            swapped = m(ids).logits.clone()
            now = m.state_dict()
            for k, v in now.items():
                if k.endswith(keys.experts_gate_up) or k.endswith(keys.experts_down):
                    p = k.rsplit(".", 1)[0].rsplit(".", 1)[0]  # model.layers.i.mlp
                    if k.endswith(keys.experts_gate_up):
                        want = torch.cat([sd[f"{p}.{keys.gate}"], sd[f"{p}.{keys.up}"]], dim=0)
                    else:
                        want = sd[f"{p}.{keys.down}"]
                    assert torch.equal(v[0], want)  # the public expert: the control's FFN
                    assert torch.equal(v[1:], start[k][1:])  # the owners' experts: untouched
                else:
                    assert torch.equal(v, start[k])  # attention, norms, routers: the anchor's
        assert not torch.allclose(swapped, before)
        assert torch.equal(m(ids).logits, before)  # restored exactly on exit


def test_export_keeps_small_files_and_records_the_commit_and_every_stage(tmp_path):
    """results/ gets the report's small files (and the privacy table's), and RUN.md with the
    commit read when the run started (passed in) and the wall time of every stage, the ones
    after the evaluation too."""
    from flexmoe.demo.export import export_results

    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "tasks").mkdir()
    (run / "report" / "results.json").write_text(json.dumps({"config": {"out": str(run)}}))
    (run / "report" / "tasks.md").write_text("# tasks\n")
    (run / "report" / "scratch.bin").write_bytes(b"x")
    (run / "privacy" / "control").mkdir(parents=True)
    (run / "privacy" / "privacy.md").write_text("# privacy\n")
    (run / "privacy" / "control" / "model.safetensors").write_bytes(b"x")
    (run / ".anchor.json").write_text(json.dumps({"seconds": 95.0}))
    (run / "tasks" / ".btm.json").write_text(json.dumps({"seconds": 5515.2}))
    dest = export_results(run / "report", tmp_path / "results", "make results PART=3", 60.0, "abc")
    assert (dest / "tasks.md").read_text() == "# tasks\n" and not (dest / "scratch.bin").exists()
    assert (dest / "privacy" / "privacy.md").read_text() == "# privacy\n"  # the table, no weights
    assert [p.name for p in (dest / "privacy").iterdir()] == ["privacy.md"]
    md = (dest / "RUN.md").read_text()
    assert "commit abc." in md and "`make results PART=3`" in md and "1.0 min" in md
    assert "| .anchor.json | 95 |" in md and "| tasks/.btm.json | 5,515 |" in md
