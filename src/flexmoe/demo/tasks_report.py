"""The downstream-tasks report (tasks.md): the paper's Table-1 form with intervals, the paired
comparisons of the merged model with each baseline, one sentence per claim, and the opt-out rows."""

from __future__ import annotations

from flexmoe.evaluation import intervals as iv
from flexmoe.evaluation import task_intervals as ti

TASK_CLAIMS = {
    iv.ANCHOR: "The merged model beats the public anchor",
    "model soup (uniform)": "The merged model beats the uniform model soup",
    "BTM (top-2 ensemble)": "The merged model beats BTM (top-2 ensemble of the dense models)",
}


def _pts(x: float) -> str:
    return f"{x * 100:+.1f}".replace("-", "−")


def _pct(x: float) -> str:
    return f"{x:+.1%}".replace("-", "−")


def _acc_text(r: dict) -> str:
    return f"{_pts(r['diff'])} points [{_pts(r['lo'])}, {_pts(r['hi'])}]"


def _bpb_text(r: dict) -> str:
    return f"{_pct(r['rel'])} [{_pct(r['rel_lo'])}, {_pct(r['rel_hi'])}]"


def _cell(m: dict) -> str:
    """acc_norm with its Wilson interval, or gold-answer BPB with its bootstrap interval."""
    v = m.get(ti.METRIC, m.get("acc", m.get("bits_per_byte")))
    if v is None or v != v:
        return "–"
    n = int(m.get("docs") or 0)
    if n > 0 and (ti.METRIC in m or "acc" in m):  # a proportion of n documents
        lo, hi = iv.wilson(round(v * n), n)
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
    if ti._kind(m) == "bpb":
        lo, hi = iv.bpb_ci(ti._windows(m))
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{v:.3f}"


def claim_lines(ivs: dict) -> list[str]:
    """One sentence per claim on tasks, from the paired intervals of merged − baseline."""
    out = []
    for b, claim in TASK_CLAIMS.items():
        cmp = ivs["merged_vs"].get(b)
        if not cmp:
            continue
        parts = []
        if ti.MC_AVG in cmp:
            r = cmp[ti.MC_AVG]
            parts.append(f"multiple choice **{r['verdict']}** ({_acc_text(r)} acc_norm)")
        if ti.BPB_AVG in cmp:
            r = cmp[ti.BPB_AVG]
            parts.append(f"gold answers **{r['verdict']}** ({_bpb_text(r)} BPB)")
        out.append(f"{claim} on tasks: " + "; ".join(parts) + ".")
    return out


def tasks_md(results: dict[str, dict[str, dict]], limit: int) -> str:
    """Table-1-style markdown: one row per model, one column per task (acc_norm for multiple
    choice, bits per byte of the gold answer for generative tasks), then the paired comparisons
    where the rows carry per-document results."""
    first = next(iter(results.values()))
    order = {"mc": 0, "bpb": 1, None: 2}  # multiple choice, then gold answers
    tasks = sorted(first, key=lambda t: order[ti._kind(first[t])])
    ivs = ti.task_intervals(results)
    md = [
        "# Downstream tasks",
        "",
        f"`flexmoe eval tasks`, the first {limit} documents of each task, the same for every "
        "model. Multiple choice: acc_norm (higher is better) with its 95% Wilson interval; gold "
        "answers: bits per byte of the gold answer (lower is better) with a bootstrap interval "
        "over documents. Comparisons resample the same documents for both models (paired); the "
        "averages resample documents within each task.",
        "",
    ]
    claims = claim_lines(ivs)
    if claims:
        md += ["## Claims on tasks", "", *[f"- {c}" for c in claims], ""]
    avg = [c for c in (ti.MC_AVG, ti.BPB_AVG) if any(c in a for a in ivs["averages"].values())]
    md += [
        "## Table",
        "",
        "| model | " + " | ".join([*tasks, *avg]) + " |",
        "|---|" + "---:|" * (len(tasks) + len(avg)),
    ]
    for m, r in results.items():
        a = ivs["averages"][m]
        cells = [_cell(r[t]) if t in r else "–" for t in tasks]
        cells += [f"{a[c]:.3f}" if c in a else "–" for c in avg]
        md.append(f"| {m} | " + " | ".join(cells) + " |")
    if ivs["merged_vs"]:
        md += [
            "",
            "## The merged model vs each model (paired 95% intervals)",
            "",
            f"| merged − … | Δ {ti.MC_AVG} (acc_norm, points) | verdict | "
            f"Δ {ti.BPB_AVG} (relative) | verdict |",
            "|---|---:|---|---:|---|",
        ]
        for b, cmp in ivs["merged_vs"].items():
            mc, bp = cmp.get(ti.MC_AVG), cmp.get(ti.BPB_AVG)
            md.append(
                f"| {b} | {_acc_text(mc) if mc else '–'} | {mc['verdict'] if mc else '–'} | "
                f"{_bpb_text(bp) if bp else '–'} | {bp['verdict'] if bp else '–'} |"
            )
    if ivs["optout"]:
        bpb_tasks = [t for t in tasks if ti._kind(first[t]) == "bpb"]
        md += [
            "",
            "## Opt-out: the merged model without each expert − with all (paired 95% intervals)",
            "",
            "Gold-answer BPB: a positive change means the answers got less likely without the "
            "expert.",
            "",
            f"| excluded | Δ {ti.MC_AVG} (points) | " + " | ".join(bpb_tasks) + " |",
            "|---|---:|" + "---:|" * len(bpb_tasks),
        ]
        for e, cmp in ivs["optout"].items():
            mc = cmp.get(ti.MC_AVG)
            cells = [_bpb_text(cmp[t]) if t in cmp else "–" for t in bpb_tasks]
            md.append(f"| {e} | {_acc_text(mc) if mc else '–'} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"
