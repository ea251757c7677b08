"""95% intervals for the demo report (flexmoe.evaluation.intervals) and the report's claims,
tables and plots built from them (flexmoe.demo.render), on small synthetic windows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import ArrayStream
from flexmoe.evaluation import intervals as iv

LN2 = math.log(2)


def windows_of(bpb: float, n: int, rng, noise: float = 0.05, nbytes=None) -> list[list[float]]:
    """n windows of ~1,000 bytes whose BPB is `bpb` up to per-window noise."""
    b = rng.integers(800, 1200, n) if nbytes is None else np.asarray(nbytes)
    nll = bpb * LN2 * b * (1 + noise * rng.standard_normal(len(b)))
    return [[float(x), int(y)] for x, y in zip(nll, b, strict=True)]


def test_bootstrap_ci_contains_the_estimate_and_shrinks_with_more_windows():
    rng = np.random.default_rng(1)
    few, many = windows_of(1.1, 16, rng), windows_of(1.1, 400, rng)
    for w in (few, many):
        lo, hi = iv.bpb_ci(w)
        assert lo < iv.bpb_of(w) < hi
    assert np.diff(iv.bpb_ci(many))[0] < 0.5 * np.diff(iv.bpb_ci(few))[0]
    assert iv.bpb_ci(few, seed=3) == iv.bpb_ci(few, seed=3)  # deterministic for a seed
    # the point estimate is the ratio estimator, Σ nll / ln 2 / Σ bytes
    a = np.array(few)
    assert iv.bpb_of(few) == pytest.approx(a[:, 0].sum() / LN2 / a[:, 1].sum())


def test_paired_intervals_and_verdicts():
    rng = np.random.default_rng(2)
    base = windows_of(1.1, 32, rng)
    nbytes = [b for _, b in base]
    same = iv.paired_diff(base, base)
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    assert iv.verdict(same["lo"], same["hi"]) == iv.TIE
    # uniformly better by 3% (plus small noise): holds, and the relative change is about −3%
    better = [[nll * 0.97 * (1 + 0.002 * rng.standard_normal()), b] for nll, b in base]
    r = iv.paired_diff(better, base)
    assert r["hi"] < 0 and iv.verdict(r["lo"], r["hi"]) == iv.HOLDS
    assert r["rel_lo"] < r["rel"] < r["rel_hi"] < 0
    assert r["rel"] == pytest.approx(-0.03, abs=0.005)
    r = iv.paired_diff(base, better)
    assert iv.verdict(r["lo"], r["hi"]) == iv.FAILS
    # two equally good models with independent noise on the same windows: not distinguishable
    a, b = windows_of(1.1, 32, rng, nbytes=nbytes), windows_of(1.1, 32, rng, nbytes=nbytes)
    r = iv.paired_diff(a, b)
    assert r["lo"] < 0 < r["hi"] and iv.verdict(r["lo"], r["hi"]) == iv.TIE
    with pytest.raises(ValueError, match="same windows"):
        iv.paired_diff(base, base[:-1])


def test_mean_over_domains():
    rng = np.random.default_rng(3)
    a = {d: windows_of(v, 24, rng) for d, v in (("public", 1.2), ("code", 0.8))}
    lo, hi = iv.mean_ci(a)
    point = np.mean([iv.bpb_of(w) for w in a.values()])
    assert lo < point < hi
    b = {d: [[nll * 1.05, n] for nll, n in w] for d, w in a.items()}
    r = iv.paired_mean_diff(a, b)
    assert r["diff"] == pytest.approx(point - np.mean([iv.bpb_of(w) for w in b.values()]))
    assert r["hi"] < 0 and iv.verdict(r["lo"], r["hi"]) == iv.HOLDS
    same = iv.paired_mean_diff(a, a)
    assert (same["lo"], same["hi"]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        iv.paired_mean_diff(a, {"public": a["public"]})


def test_wilson_matches_the_known_interval():
    lo, hi = iv.wilson(50, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.404, 0.596)
    assert iv.wilson(0, 10)[0] == 0.0 and iv.wilson(10, 10)[1] == 1.0


DOMS = ["public", "code", "math"]


def synthetic_results(with_windows: bool = True) -> dict:
    """A small demo results dict: the merged model 4% better than the anchor, equal to the uniform
    soup, worse than BTM; a lean 2-expert row (math not measured); opt-outs."""
    rng = np.random.default_rng(0)
    nbytes = {d: rng.integers(800, 1200, 24) for d in DOMS}
    anchor = {d: windows_of(1.1, 24, rng, nbytes=nbytes[d]) for d in DOMS}

    def scaled(src, f, noise=0.003, only=DOMS):
        return {
            d: [[x * f * (1 + noise * rng.standard_normal()), b] for x, b in src[d]] for d in only
        }

    merged = scaled(anchor, 0.96)
    windows = {
        "anchor (public only)": anchor,
        "FlexOlmo merged": merged,
        "model soup (uniform)": scaled(merged, 1.0, noise=0.02),
        "BTM (top-2 ensemble)": scaled(merged, 0.97),
        "2-expert: public+code": scaled(merged, 0.99, only=["public", "code"]),
        "optout: code": {d: scaled(merged, 1.08 if d == "code" else 1.0)[d] for d in DOMS},
        "optout: math": {d: scaled(merged, 1.06 if d == "math" else 1.0)[d] for d in DOMS},
    }

    def row(w):
        r = {d: iv.bpb_of(w[d]) if d in w else float("nan") for d in DOMS}
        r["mean"] = sum(r[d] for d in DOMS) / len(DOMS)
        r["closed mean"] = (r["code"] + r["math"]) / 2
        return r

    main = {k: row(w) for k, w in windows.items() if not k.startswith("optout")}
    experts = ["public", "code", "math"]
    res = {
        "domains": DOMS,
        "experts": experts,
        "main": main,
        "optout": {e: row(windows[f"optout: {e}"]) for e in ("code", "math")},
        "optout_rt": None,
        "no_bias": main["FlexOlmo merged"],
        "sources": {},
        "topk": {},
        "router_cosine": np.eye(3).tolist(),
        "routing": {d: np.full((2, 3), 1 / 3).tolist() for d in DOMS},
        "generation": {
            "prompt": "def f(",
            "full": {"text": "x):", "attribution": {"public": 0.6, "code": 0.4}},
            "excluded": "code",
            "without": {"text": "y):", "attribution": {"public": 1.0}},
            "only": {"text": "x):", "attribution": {"public": 0.5, "code": 0.5}},
        },
    }
    if with_windows:
        res["windows"] = windows
        res["intervals"] = iv.demo_intervals(windows, DOMS, seq_len=256, n_boot=500)
    return res


def test_report_claims_tables_and_plots(tmp_path):
    from flexmoe.demo.render import claim_lines, rebuild, write_report
    from flexmoe.demo.tasks_report import tasks_md

    res = synthetic_results()
    ivs = res["intervals"]
    assert ivs["windows"] == {d: 24 for d in DOMS} and ivs["tokens"]["code"] == 24 * 256
    assert "math" not in ivs["rows"]["2-expert: public+code"]  # not measured: no interval
    assert "mean" not in ivs["merged_vs"]["2-expert: public+code"]
    assert ivs["optout"]["code"]["code"]["verdict"] == iv.FAILS  # worse without the expert
    claims = claim_lines(res)
    assert claims[0].startswith("The merged model beats the public anchor: **holds** (mean −4.0%")
    assert "uniform model soup: **not distinguishable at this budget**" in claims[1]
    assert "BTM (top-2 ensemble of the dense models): **does not hold**" in claims[2]
    assert claims[3].startswith("The merged model beats the code owner's 2-expert model")
    assert "on code" in claims[3] and "on the mean" not in claims[3]
    out = write_report(res, tmp_path / "run" / "report")
    md = (out / "report.md").read_text()
    assert md.index("## Claims at this budget") < md.index("## Main table")
    a = res["main"]["anchor (public only)"]["code"]
    lo, hi = ivs["rows"]["anchor (public only)"]["code"]
    assert f"{a:.3f} [{lo:.3f}, {hi:.3f}]" in md
    assert "Windows per domain: public 24 (6,144 tokens)" in md
    assert "Δ BPB vs all experts, paired 95% interval" in md
    for png in ("main.png", "optout.png", "routing.png"):
        assert (out / png).stat().st_size > 0

    # results written before intervals existed: rendered without them, and said so
    old = synthetic_results(with_windows=False)
    (tmp_path / "old" / "report").mkdir(parents=True)
    (tmp_path / "old" / "report" / "results.json").write_text(json.dumps(old))
    out = rebuild(tmp_path / "old")
    md = (out / "report.md").read_text()
    assert "no intervals (results written by an older flexmoe)" in md
    assert f"| {res['main']['anchor (public only)']['code']:.3f} |" in md  # a plain BPB cell
    assert (out / "main.png").stat().st_size > 0 and (out / "optout.png").is_file()

    tasks = {"anchor": {"arc": {"acc": 0.4, "acc_norm": 0.5, "docs": 100.0}, "gsm": {}}}
    tasks["anchor"]["gsm"] = {"bits_per_byte": 1.234, "docs": 100.0}
    t = tasks_md(tasks, 100)
    assert "| anchor | 0.500 [0.404, 0.596] | 1.234 |" in t


def test_scored_windows_add_up_to_the_bpb_and_lean_rows_have_none_for_unmeasured():
    import torch

    from flexmoe.evaluation.demo_eval import EvalSettings, _bpb
    from flexmoe.inference.bpb import eval_windows, evaluate_bpb

    rng = np.random.default_rng(0)
    V = 16
    tb = np.array([0, *rng.integers(1, 4, V - 1)])  # token 0 (EOS) covers no bytes
    stream = ArrayStream(rng.integers(0, V, 1000))
    g = torch.Generator().manual_seed(0)
    table = torch.randn(V, V, generator=g)

    def fn(ids):
        return table[ids]

    r = evaluate_bpb(fn, stream, tb, seq_len=32, batch_size=3, max_tokens=320)
    w = np.array(r["windows"])
    assert len(w) == len(eval_windows(stream, 32, 320)) == 10
    assert w[:, 1].sum() == r["bytes"]
    assert iv.bpb_of(r["windows"]) == pytest.approx(r["bpb"], rel=1e-12)

    s = EvalSettings(domains=("code",), seq_len=32, eval_tokens=320, baselines=False, prompt="")
    streams = {"public": stream, "code": ArrayStream(rng.integers(0, V, 800))}
    row = _bpb(fn, streams, tb, s, only=["code"])
    assert row["public"] != row["public"] and set(row.windows) == {"code"}
    assert set(json.loads(json.dumps(row))) == {"public", "code", "mean", "closed mean"}
    ivs = iv.demo_intervals({"anchor (public only)": row.windows}, list(streams), 32, n_boot=50)
    assert set(ivs["rows"]["anchor (public only)"]) == {"code"}  # no mean: public not measured


def test_control_claims_bias_comparison_and_training_curves(tmp_path):
    """The public-continued control is a baseline the merged model is judged against, the merge
    with the control's FFN is compared with the control, the inference variants' windows give
    the bias its paired interval, and training curves are drawn from results["curves"]."""
    from flexmoe.demo.render import claim_lines, write_report

    res = synthetic_results()
    rng = np.random.default_rng(5)
    w = res["windows"]

    def scaled(src, f):
        return {
            d: [[x * f * (1 + 0.003 * rng.standard_normal()), b] for x, b in src[d]] for d in DOMS
        }

    merged = w["FlexOlmo merged"]
    w[iv.CONTROL] = scaled(w["anchor (public only)"], 0.98)  # the merged model (0.96) beats it
    w[iv.CONTROL_MERGED] = scaled(w[iv.CONTROL], 0.97)  # owners' experts add to the control
    w[f"{iv.VARIANT}flexmoe recipe: token"] = scaled(merged, 1.0)
    w[f"{iv.VARIANT}flexmoe recipe: stock"] = scaled(merged, 0.98)  # b = 0 better: bias hurts
    for k in (iv.CONTROL, iv.CONTROL_MERGED):
        res["main"][k] = {d: iv.bpb_of(w[k][d]) for d in DOMS}
        res["main"][k]["mean"] = sum(res["main"][k][d] for d in DOMS) / len(DOMS)
    ivs = res["intervals"] = iv.demo_intervals(w, DOMS, seq_len=256, n_boot=300)
    assert not any(k.startswith(iv.VARIANT) for k in ivs["vs_anchor"])  # not a table row
    assert ivs["merged_vs"][iv.CONTROL]["mean"]["verdict"] == iv.HOLDS
    assert ivs["pairs"][f"{iv.CONTROL_MERGED} vs {iv.CONTROL}"]["mean"]["verdict"] == iv.HOLDS
    assert ivs["bias"]["flexmoe recipe"]["mean"]["verdict"] == iv.FAILS
    claims = claim_lines(res)
    assert any(c.startswith("The merged model beats the public-continued control") for c in claims)
    assert any(
        c.startswith("The owners' experts add to the public-continued control") for c in claims
    )
    res["curves"] = {"experts/code": [[1024, 2.0], [2048, 1.8]], "dense/code": [[1024, 1.9]]}
    out = write_report(res, tmp_path / "report")
    assert (out / "curves.png").stat().st_size > 0
    assert f"| {iv.CONTROL} |" in (out / "report.md").read_text()


def _task_row(rng, acc: float, ll_scale: float, n: int = 64) -> dict:
    # the gold answers' bytes are the documents' own: the same for every model
    """A run_tasks(..., per_doc=True) row: two multiple-choice tasks and one gold-answer task."""
    row = {}
    for t in ("arc", "piqa"):
        hits = (rng.random(n) < acc).astype(float)
        row[t] = {"acc": hits.mean(), "acc_norm": hits.mean(), "docs": float(n)}
        row[t]["per_doc"] = {"acc": hits.tolist(), "acc_norm": hits.tolist()}
    nbytes = np.random.default_rng(1).integers(50, 200, n)
    ll = -nbytes * ll_scale * (1 + 0.05 * rng.standard_normal(n))
    bpb = float(-ll.sum() / np.log(2) / nbytes.sum())
    row["gsm8k_bpb"] = {"bits_per_byte": bpb, "docs": float(n)}
    row["gsm8k_bpb"]["per_doc"] = {"loglikelihood": ll.tolist(), "bytes": nbytes.tolist()}
    return row


def test_task_intervals_are_paired_and_judge_each_claim():
    from flexmoe.demo.tasks_report import tasks_md
    from flexmoe.evaluation import task_intervals as ti

    rng = np.random.default_rng(0)
    anchor = _task_row(rng, 0.3, 0.50)
    merged = _task_row(rng, 0.8, 0.40)  # clearly better on both kinds
    soup = json.loads(json.dumps(merged))  # the same answers: a tie, exactly 0
    worse = json.loads(json.dumps(merged))
    worse["gsm8k_bpb"]["per_doc"]["loglikelihood"] = [
        x * 1.2 for x in worse["gsm8k_bpb"]["per_doc"]["loglikelihood"]
    ]
    res = {
        iv.ANCHOR: anchor,
        iv.MERGED: merged,
        "model soup (uniform)": soup,
        "merged without math": worse,
    }
    ivs = ti.task_intervals(res, n_boot=500)
    mv = ivs["merged_vs"]
    assert mv[iv.ANCHOR][ti.MC_AVG]["verdict"] == iv.HOLDS
    assert mv[iv.ANCHOR][ti.MC_AVG]["lo"] > 0.3  # ~+50 points
    assert mv[iv.ANCHOR][ti.BPB_AVG]["verdict"] == iv.HOLDS
    assert mv["model soup (uniform)"][ti.MC_AVG] == {
        "diff": 0.0,
        "lo": 0.0,
        "hi": 0.0,
        "verdict": iv.TIE,
    }
    opt = ivs["optout"]["math"]
    assert opt["gsm8k_bpb"]["rel"] == pytest.approx(0.2) and opt["gsm8k_bpb"]["rel_lo"] > 0.19
    # paired: the interval of a difference is far narrower than either model's own interval
    d = mv["model soup (uniform)"]["gsm8k_bpb"]
    assert d["hi"] - d["lo"] < 1e-12
    md = tasks_md(res, 64)
    assert "- The merged model beats the public anchor on tasks: multiple choice **holds**" in md
    assert "uniform model soup on tasks: multiple choice **not distinguishable" in md
    assert "BTM" not in md  # not measured: no sentence, no row
    assert "| math | +0.0 points [+0.0, +0.0] | +20.0% [" in md
    g = anchor["gsm8k_bpb"]["per_doc"]
    lo, hi = iv.bpb_ci([[-x, b] for x, b in zip(g["loglikelihood"], g["bytes"], strict=True)])
    assert f"{anchor['gsm8k_bpb']['bits_per_byte']:.3f} [{lo:.3f}, {hi:.3f}]" in md
