"""The demo's report from its measured results (flexmoe.evaluation.demo_eval): the claims at
this budget (one sentence each, from paired 95% intervals), the main table with intervals,
opt-out (with paired deltas), router tuning, recipes side by side, ablations, per-source BPB,
top-k, router embeddings, a generation with attribution, plots and the downstream-tasks table
(with Wilson intervals). Results written before flexmoe measured intervals render without them.

Only text and figures are made here; nothing is measured. `flexmoe report RUN_DIR` rebuilds
report.md and the plots from results.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from flexmoe.data.corpus import PUBLIC
from flexmoe.demo.tasks_report import tasks_md
from flexmoe.errors import FlexmoeError
from flexmoe.evaluation import intervals as iv
from flexmoe.store.fsutil import atomic_file, write_json

NO_INTERVALS = "no intervals (results written by an older flexmoe)"


def _fmt(v: float) -> str:
    return "–" if v != v else f"{v:.3f}"  # NaN: not evaluated (lean evaluation)


def _ci(v: float, ci) -> str:
    """'1.100 [1.081, 1.119]': a BPB and its 95% interval; '–' when not measured."""
    if v != v:
        return "–"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def _signed(x: float, fmt: str) -> str:
    return format(x, fmt).replace("-", "−")  # a true minus sign: −3.2%


def _diff_cell(r: dict | None) -> str:
    """'+0.052 [+0.031, +0.070]': a paired BPB difference and its interval."""
    if not r:
        return "–"
    return f"{_signed(r['diff'], '+.3f')} [{_signed(r['lo'], '+.3f')}, {_signed(r['hi'], '+.3f')}]"


def _rel_text(r: dict) -> str:
    return (
        f"{_signed(r['rel'], '+.1%')} "
        f"[{_signed(r['rel_lo'], '+.1%')}, {_signed(r['rel_hi'], '+.1%')}]"
    )


def intervals_of(results: dict) -> dict | None:
    """results["intervals"]; computed from results["windows"] when only those were stored; None
    for results written before flexmoe measured intervals."""
    if results.get("intervals"):
        return results["intervals"]
    if results.get("windows"):
        seq_len = (results.get("config") or {}).get("seq_len")
        return iv.demo_intervals(results["windows"], results["domains"], seq_len)
    return None


ROW_ORDER = (
    "anchor",
    "dense expert",
    "model soup",
    "BTM",
    "control",
    "2-expert",
    "FlexOlmo merged",
    "FlexOlmo merged + router tuning",
    "ablation",
)


def row_order(names) -> list[str]:
    """Table order by model family (results.json stores rows with sorted keys)."""

    def rank(n: str) -> int:
        return max(i for i, p in enumerate(ROW_ORDER) if n.startswith(p))

    return sorted(names, key=lambda n: (rank(n), n))


def main_table_md(results: dict) -> str:
    """Each cell: BPB [95% interval] (just the BPB for results without intervals); the best of
    each column in bold; '–' where not measured."""
    cols = [*results["domains"], "mean"]
    ivs = (intervals_of(results) or {}).get("rows", {})
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    best = {  # NaN: not evaluated (lean evaluation), never the best
        c: min((r[c] for r in results["main"].values() if r[c] == r[c]), default=None) for c in cols
    }
    for name in row_order(results["main"]):
        r, ci = results["main"][name], ivs.get(name, {})
        cells = [
            f"**{_ci(r[c], ci.get(c))}**" if r[c] == best[c] else _ci(r[c], ci.get(c)) for c in cols
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interval_note(results: dict) -> str:
    """What the intervals are: what was resampled, and how many windows/tokens per domain."""
    ivs = intervals_of(results)
    if ivs is None:
        return f"Held-out BPB, lower is better; {NO_INTERVALS}. – : not measured."
    n = ivs.get("windows", {})
    tok = ivs.get("tokens", {})
    per = ", ".join(
        f"{d} {n[d]}" + (f" ({tok[d]:,} tokens)" if d in tok else "")
        for d in results["domains"]
        if d in n
    )
    few = min(n.values(), default=0) < iv.FEW_WINDOWS
    return (
        f"Held-out BPB, lower is better; each cell is the BPB and its {ivs['level']:.0%} interval: "
        f"a percentile bootstrap ({ivs['n_boot']} draws, seed {ivs['seed']}) over the scored "
        "held-out windows, resampling windows rather than documents (documents are joined into "
        "one stream and few per domain at this budget). Windows per domain: "
        f"{per}. Windows of one document are not independent, so the intervals are, if "
        "anything, too narrow"
        + (f"; with fewer than {iv.FEW_WINDOWS} windows per domain they are rough" if few else "")
        + ". Comparisons below are paired: both models are scored on the same windows and each "
        "draw resamples the same windows for both. – : not measured (lean evaluation)."
    )


def _by_verdict(cmp: dict, cols: list[str]) -> str:
    """'holds on code, math; not distinguishable at this budget on public' (per domain)."""
    groups: dict[str, list[str]] = {}
    for c in cols:
        if c in cmp:
            groups.setdefault(cmp[c]["verdict"], []).append(c)
    return "; ".join(f"{v} on {', '.join(ds)}" for v, ds in groups.items())


CLAIMS = {
    "anchor (public only)": "The merged model beats the public anchor",
    "model soup (uniform)": "The merged model beats the uniform model soup",
    "model soup (weighted)": "The merged model beats the likelihood-weighted model soup",
    "BTM (top-2 ensemble)": "The merged model beats BTM (top-2 ensemble of the dense models)",
    iv.CONTROL: (
        "The merged model beats the public-continued control (the anchor continued on public "
        "text with one expert's budget: what adaptation to FlexMix-style text alone gives)"
    ),
    iv.UNRESTRICTED: (
        "The merged model beats a standard MoE trained on the pooled data without restrictions "
        "(the unrestricted MoE: the owners' data pooled, the same training tokens as all "
        "experts together)"
    ),
    iv.UNRESTRICTED_ALL: (
        "The merged model beats the unrestricted MoE in the paper's form (all data pooled, the "
        "public split included; the same training tokens as all experts together)"
    ),
    iv.PAPER: (
        "flexmoe's recipe beats the paper's (the merged model of the paper recipe's experts, "
        "same budgets, served as the paper serves it: token routing alone)"
    ),
}
PAIR_CLAIMS = {
    f"{iv.CONTROL_MERGED} vs {iv.CONTROL}": (
        "The owners' experts add to the public-continued control (the merge with the control's "
        "FFN as its public expert beats the control)"
    ),
}


def claim_lines(results: dict) -> list[str]:
    """One sentence per claim, from the paired intervals of merged − other (lower is better):
    'holds' (the interval of the difference is below 0), 'does not hold' (above 0), or 'not
    distinguishable at this budget'."""
    ivs = intervals_of(results)
    if ivs is None:
        return [f"No claims judged: {NO_INTERVALS}."]
    main, doms = results["main"], results["domains"]
    if "FlexOlmo merged" not in main:
        return ["No claims judged: the results have no merged model."]
    mv = ivs.get("merged_vs", {})
    out = []

    def sentence(claim: str, cmp: dict, col: str, extra: str = "") -> str:
        if col not in cmp:
            return f"{claim}: not measured (lean evaluation)."
        r = cmp[col]
        where = "mean" if col == "mean" else f"on {col}"
        return f"{claim}: **{r['verdict']}** ({where} {_rel_text(r)} BPB{extra})."

    for b, claim in CLAIMS.items():
        if b in main:
            cmp = mv.get(b, {})
            per = _by_verdict(cmp, doms)
            out.append(sentence(claim, cmp, "mean", f"; per domain: {per}" if per else ""))
    for key, claim in PAIR_CLAIMS.items():
        if key in ivs.get("pairs", {}):
            cmp = ivs["pairs"][key]
            per = _by_verdict(cmp, doms)
            out.append(sentence(claim, cmp, "mean", f"; per domain: {per}" if per else ""))
    for k in row_order(main):
        if k.startswith(iv.TWO_EXPERT):
            d = k[len(iv.TWO_EXPERT) :]
            claim = (
                f"The merged model beats the {d} owner's 2-expert model (public+{d}, the "
                f"merged model's ceiling on {d}) on {d}"
            )
            cmp = mv.get(k, {})
            m = cmp.get("mean")
            extra = f"; on the mean: {m['verdict']}, {_rel_text(m)}" if m else ""
            out.append(sentence(claim, cmp, d, extra))
    return out


def print_main_table(results: dict) -> None:
    cols = [*results["domains"], "mean"]
    t = Table(title="held-out bits per byte (lower is better)")
    t.add_column("model")
    for c in cols:
        t.add_column(c, justify="right")
    for name in row_order(results["main"]):
        t.add_row(name, *[_fmt(results["main"][name][c]) for c in cols])
    Console().print(t)
    for line in claim_lines(results):
        Console().print("  " + line.replace("**", ""), highlight=False, markup=False)
    oo = Table(title="opt-out: FlexOlmo merged with one expert excluded")
    oo.add_column("excluded")
    for c in cols:
        oo.add_column(c, justify="right")
    full = results["main"]["FlexOlmo merged"]
    oo.add_row("(none)", *[_fmt(full[c]) for c in cols])
    for d, r in results["optout"].items():
        oo.add_row(d, *[_fmt(r[c]) for c in cols])
    Console().print(oo)
    sel = results.get("selectivity") or {}
    if sel:
        doms = [d for d in results["domains"] if d != PUBLIC]
        st = Table(title="selective experts: recipes side by side")
        cols = ["recipe", "public Δ", *[f"ret. {d}" for d in doms], "mean ret.", "merged"]
        for c in [*cols, "route pub", "route own (min)"]:
            st.add_column(c, justify="left" if c == "recipe" else "right")
        for label, r in sel.items():
            diag = r["routing_diagonal"]
            st.add_row(
                label,
                f"{r['public_delta']:+.1%}",
                *[f"{r['retention'][d]:.0%}" for d in doms],
                f"{r['mean_retention']:.0%}",
                _fmt(r["merged"]["mean"]),
                f"{diag[PUBLIC]:.2f}",
                f"{min(diag[d] for d in doms):.2f}",
            )
        Console().print(st)
    g = results["generation"]
    Console().print(
        f"\n[bold]generation[/] prompt {g['prompt']!r}\n  all experts: {g['full']['text']!r}"
        f"\n  attribution: "
        + ", ".join(f"{k} {v:.0%}" for k, v in g["full"]["attribution"].items())
        + f"\n  without '{g['excluded']}': {g['without']['text']!r}"
        + (f"\n  public + '{g['excluded']}' only: {g['only']['text']!r}" if g.get("only") else "")
    )


def write_report(results: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    plots = make_plots(results, out)
    doms = results["domains"]
    cols = [*doms, "mean"]
    full = results["main"]["FlexOlmo merged"]
    md = [
        "# flexmoe demo report",
        "",
        "Held-out bits per byte on FlexMix-mini (lower is better). Produced by `make demo` "
        "(`python scripts/demo.py`); rebuild this file with `flexmoe report "
        f"{out.parent}`.",
        "",
        "## Claims at this budget",
        "",
        "Each claim is read from the paired 95% interval of the merged model's held-out BPB "
        "minus the other model's (relative to the other model; lower is better): **holds** when "
        "the whole interval is below 0, **does not hold** when it is above 0, otherwise **not "
        "distinguishable at this budget**.",
        "",
        *[f"- {line}" for line in claim_lines(results)],
        "",
        "## Main table",
        "",
        interval_note(results),
        "",
        main_table_md(results),
        "",
        "## Opt-out",
        "",
        "FlexOlmo merged with one expert excluded at inference "
        "(no retraining; exact by construction).",
        "",
        "| excluded | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        "| (none) | " + " | ".join(_fmt(full[c]) for c in cols) + " |",
    ]
    for d, r in results["optout"].items():
        md.append(f"| {d} | " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    md += optout_delta_md(results, cols)
    if results.get("optout_rt"):
        tuned = results["main"]["FlexOlmo merged + router tuning"]
        md += [
            "",
            "## Router tuning (RT)",
            "",
            "Routers tuned on the owners' public proxies (experts frozen). The exact opt-out "
            "guarantee holds for the un-tuned model; below, each expert excluded from the "
            "router-tuned model (Δ vs the same model with all experts).",
            "",
            "| excluded | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
            "| (none), no RT | " + " | ".join(_fmt(full[c]) for c in cols) + " |",
            "| (none), RT | " + " | ".join(_fmt(tuned[c]) for c in cols) + " |",
        ]
        rt_iv = (intervals_of(results) or {}).get("optout_rt", {})
        for d, r in results["optout_rt"].items():
            ci = rt_iv.get(d, {})
            md.append(
                f"| {d}, RT | "
                + " | ".join(
                    f"{_fmt(r[c])} ({_diff_cell(ci[c]) if c in ci else f'{r[c] - tuned[c]:+.3f}'})"
                    for c in cols
                )
                + " |"
            )
    md += selectivity_md(results)
    nb = results["no_bias"]
    md += ["", "## Ablation: router bias", ""]
    if results.get("router_bias", True):
        md += [
            "Stock transformers' MoE routers have no bias; the stock-loadable export runs "
            "with b = 0.",
            "",
            "| model | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
            "| with bias (flexmoe loader) | " + " | ".join(_fmt(full[c]) for c in cols) + " |",
            "| without bias (stock load) | " + " | ".join(_fmt(nb[c]) for c in cols) + " |",
            "",
        ]
    else:
        md += [
            "This family's merged models carry no router bias (b = 0: `router_bias` in "
            "model/arch.py, where the measurement that dropped it is cited), so the stock "
            "export computes exactly what flexmoe's loader does.",
            "",
        ]
    src = results.get("sources") or {}
    if src:
        names_s = list(next(iter(src.values())))
        md += [
            "## Per source",
            "",
            "Held-out BPB per source of a domain, so a domain's number is not carried by one "
            "kind of text (math: generated worked problems vs the Maxima and GAP manuals).",
            "",
            "| model | " + " | ".join(names_s) + " |",
            "|---|" + "---:|" * len(names_s),
        ]
        md += [f"| {m} | " + " | ".join(_fmt(r[n]) for n in names_s) + " |" for m, r in src.items()]
        md.append("")
    rn = None
    if "renormalize" in results:  # the section only where the other rule was measured
        rn = results["selectivity"][next(iter(results["selectivity"]))]["variants"].get("renorm")
    if rn:
        rule = "renormalises" if results["renormalize"] else "does not renormalise"
        md += [
            "## Top-k renormalisation",
            "",
            f"The merged model ({results['architecture']}) {rule} its top-k routing weights, as "
            "its stock class does. The same model with the other rule:",
            "",
            "| rule | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
            f"| as merged ({'renormalised' if results['renormalize'] else 'not renormalised'}, "
            "token routing) | "
            + " | ".join(
                _fmt(
                    results["selectivity"][next(iter(results["selectivity"]))]["variants"]["token"][
                        c
                    ]
                )
                for c in cols
            )
            + " |",
            f"| {'not renormalised' if results['renormalize'] else 'renormalised'} | "
            + " | ".join(_fmt(rn[c]) for c in cols)
            + " |",
            "",
        ]
    if results["topk"]:
        md += [
            "## Active experts (top-k)",
            "",
            "| k | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        md += [
            f"| {k} | " + " | ".join(_fmt(r[c]) for c in cols) + " |"
            for k, r in results["topk"].items()
        ]
    names = results["experts"]
    md += [
        "",
        "## Router embeddings",
        "",
        "Cosine similarity of the router rows (mean over layers).",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for n, row in zip(names, results["router_cosine"], strict=True):
        md.append(f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    g = results["generation"]
    md += [
        "",
        "## Generation with attribution",
        "",
        f"Prompt: `{g['prompt']}`",
        "",
        f"- all experts: `{g['full']['text']!r}` — attribution "
        + ", ".join(f"{k} {v:.0%}" for k, v in g["full"]["attribution"].items()),
        f"- without `{g['excluded']}`: `{g['without']['text']!r}` — attribution "
        + ", ".join(f"{k} {v:.0%}" for k, v in g["without"]["attribution"].items()),
    ]
    if g.get("only"):
        md.append(
            f"- public + `{g['excluded']}` only: `{g['only']['text']!r}` — attribution "
            + ", ".join(f"{k} {v:.0%}" for k, v in g["only"]["attribution"].items())
        )
    md += [
        "",
        "## Plots",
        "",
    ] + [f"![{p.stem}]({p.name})" for p in plots]
    with atomic_file(out / "report.md") as f:
        f.write("\n".join(md) + "\n")
    return out


def optout_delta_md(results: dict, cols: list[str]) -> list[str]:
    """Each opt-out as a paired difference: BPB with the expert excluded − BPB with all experts,
    and its 95% interval (bold where the interval excludes 0)."""
    ivs = intervals_of(results)
    if ivs is None:
        return ["", f"Opt-out deltas: {NO_INTERVALS}."]
    oo = ivs.get("optout", {})
    md = [
        "",
        "Δ BPB vs all experts, paired 95% interval (positive: worse without the expert; bold: "
        "the interval excludes 0):",
        "",
        "| excluded | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for d in results["optout"]:
        cmp = oo.get(d, {})
        cells = [
            f"**{_diff_cell(cmp[c])}**"
            if c in cmp and cmp[c]["verdict"] != iv.TIE
            else _diff_cell(cmp.get(c))
            for c in cols
        ]
        md.append(f"| {d} | " + " | ".join(cells) + " |")
    return md


VARIANT_LABELS = {
    "token": "token routing alone (no preselection)",
    "stock": "stock loader (b = 0)",
    "renorm": "the other top-k rule (renormalised ⇄ not)",
    "equal-norm": "router rows with equalised norms",
    "preselect-1": "preselect 1 expert per request",
    "preselect-2": "preselect 2 experts per request",
}


def selectivity_md(results: dict) -> list[str]:
    """Recipes side by side: public Δ, retention, routing, inference variants."""
    sel = results.get("selectivity")
    if not sel:
        return []
    doms = [d for d in results["domains"] if d != PUBLIC]
    cols = [*results["domains"], "mean"]
    md = [
        "",
        "## Selective experts: recipes side by side",
        "",
        "Retention = (anchor − merged) / (anchor − the owner's 2-expert model), held-out BPB on "
        "the owner's domain: the share of an expert's own gain that survives the merge. Routing = "
        "share of routing weight (mean over layers) that a domain's text gives its own expert "
        "(the public expert for public text).",
        "",
        "| recipe | public Δ vs anchor | "
        + " | ".join(f"retention {d}" for d in doms)
        + " | mean retention | merged mean BPB | "
        + " | ".join(f"routing {d}" for d in results["domains"])
        + " |",
        "|---|" + "---:|" * (3 + 2 * len(doms) + 1),
    ]
    for label, r in sel.items():
        md.append(
            f"| {label} | {r['public_delta']:+.1%} | "
            + " | ".join(f"{r['retention'][d]:.0%}" for d in doms)
            + f" | {r['mean_retention']:.0%} | {r['merged']['mean']:.3f} | "
            + " | ".join(f"{r['routing_diagonal'][d]:.2f}" for d in results["domains"])
            + " |"
        )
    for label, r in sel.items():
        md += [
            "",
            f"Routing matrix, {label} (rows: text; columns: experts; mean over layers):",
            "",
            "| text \\ expert | " + " | ".join(results["experts"]) + " |",
            "|---|" + "---:|" * len(results["experts"]),
        ]
        for d in results["domains"]:
            row = np.mean(r["routing"][d], axis=0)
            md.append(f"| {d} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    md += [
        "",
        "Inference variants of each merged model (same weights; held-out BPB):",
        "",
        "| recipe | variant | " + " | ".join(cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for label, r in sel.items():
        md.append(
            f"| {label} | as merged | " + " | ".join(_fmt(r["merged"][c]) for c in cols) + " |"
        )
        for v, row in r["variants"].items():
            md.append(
                f"| {label} | {VARIANT_LABELS.get(v, v)} | "
                + " | ".join(_fmt(row[c]) for c in cols)
                + " |"
            )
    for label, cmp in ((intervals_of(results) or {}).get("bias") or {}).items():
        if "mean" in cmp and results.get("router_bias", True):
            md += [
                "",
                f"The learned router bias helps ({label}; token routing with the bias vs b = 0, "
                f"what stock transformers computes; paired 95% interval): "
                f"**{cmp['mean']['verdict']}** (mean {_rel_text(cmp['mean'])} BPB; per domain: "
                f"{_by_verdict(cmp, results['domains'])}).",
            ]
    return md


def make_plots(results: dict, out: Path) -> list[Path]:
    import matplotlib  # optional (the eval extra), and slow to import: only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms, names = results["domains"], results["experts"]
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    def heatmap(mat, rows, cols, cmap, fmt, label, title, name, marks=None, **kw) -> None:
        fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 3, 0.6 * len(rows) + 1.8))
        im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, **kw)
        ax.set_xticks(range(len(cols)), cols, rotation=30)
        ax.set_yticks(range(len(rows)), rows)
        for (i, j), v in np.ndenumerate(mat):
            if v == v:  # nothing drawn for what was not measured
                mark = "*" if marks is not None and marks[i][j] else ""
                r, g, b, _ = im.cmap(im.norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(
                    j,
                    i,
                    format(v, fmt) + mark,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
        fig.colorbar(im, label=label)
        ax.set_title(title)
        save(fig, name)

    ivs = intervals_of(results)
    full = results["main"]["FlexOlmo merged"]
    optout = results["optout"]
    oo_mat = np.array([[optout[e][d] - full[d] for d in doms] for e in optout], dtype=float)
    oo_iv = (ivs or {}).get("optout", {})
    span = float(np.nanmax(np.abs(oo_mat), initial=0.0)) or 1e-3
    heatmap(
        oo_mat,
        [f"without {e}" for e in optout],
        doms,
        "RdBu_r",
        "+.3f",
        "Δ BPB vs all experts (red: worse)",
        "opt-out: held-out BPB change without one expert\n"
        + ("(*: the paired 95% interval excludes 0)" if ivs else f"({NO_INTERVALS})"),
        "optout.png",
        marks=[
            [oo_iv.get(e, {}).get(d, {}).get("verdict", iv.TIE) != iv.TIE for d in doms]
            for e in optout
        ],
        vmin=-span,
        vmax=span,
    )
    heatmap(
        np.array([np.mean(results["routing"][d], axis=0) for d in doms]),
        doms,
        names,
        "Blues",
        ".2f",
        "share of routing weight",
        "routing: held-out tokens of each domain → experts",
        "routing.png",
        vmin=0,
        vmax=1,
    )
    # top-k curve (ablation runs only)
    ks = sorted(int(k) for k in results["topk"])
    if ks:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key, marker in (("mean", "o"), ("closed mean", "s")):
            ax.plot(ks, [results["topk"][str(k)][key] for k in ks], marker=marker, label=key)
        ax.set_xlabel("active experts per token (top-k)")
        ax.set_ylabel("held-out BPB")
        ax.legend()
        ax.set_title("top-k")
        save(fig, "topk.png")
    change_vs_anchor_plot(results, ivs, plt, save)
    curves_plot(results.get("curves") or {}, plt, save)
    return paths


def curves_plot(curves: dict, plt, save) -> bool:
    """curves.png: training loss (next-token CE on the model's own training batches, nats) vs
    tokens seen, one panel per domain, for every model trained in the run (results["curves"]:
    {"<kind>/<domain>": [[tokens, loss], ...]} from each run's metrics.jsonl)."""
    labels = {"experts": "expert", "experts-paper": "expert (paper recipe)"}
    labels |= {"dense": "dense expert", "control": "control (anchor continued)"}
    doms = sorted({k.split("/", 1)[1] for k in curves})
    if not doms:
        return False
    fig, axes = plt.subplots(1, len(doms), figsize=(3.2 * len(doms), 3), squeeze=False)
    for ax, d in zip(axes[0], doms, strict=True):
        for key, pts in sorted(curves.items()):
            kind, dom = key.split("/", 1)
            if dom == d and pts:
                label = labels.get(kind, kind)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("training tokens", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (nats/token)", fontsize=8)
    save(fig, "curves.png")
    return True


def change_vs_anchor_plot(results: dict, ivs: dict | None, plt, save) -> bool:
    """main.png: per column (domains, mean) each model's % change in held-out BPB vs the anchor,
    with the paired 95% interval as whiskers; nothing drawn where a value was not measured."""
    main, anchor = results["main"], iv.ANCHOR
    if anchor not in main:
        return False
    cols = [*results["domains"], "mean"]
    models = [m for m in row_order(main) if m != anchor]
    if not models:
        return False
    vs = (ivs or {}).get("vs_anchor", {})
    fig, axes = plt.subplots(
        1,
        len(cols),
        figsize=(2.1 * len(cols) + 3.2, 0.32 * len(models) + 1.6),
        sharey=True,
        squeeze=False,
    )
    for ax, c in zip(axes[0], cols, strict=True):
        for i, m in enumerate(models):
            r = vs.get(m, {}).get(c)
            if r is not None:
                x, err = (
                    100 * r["rel"],
                    [[100 * (r["rel"] - r["rel_lo"])], [100 * (r["rel_hi"] - r["rel"])]],
                )
            else:
                a, v = main[anchor][c], main[m][c]
                if v != v or a != a:
                    continue  # not measured: nothing drawn
                x, err = 100 * (v / a - 1), None
            color = "tab:red" if m.startswith("FlexOlmo merged") else "tab:gray"
            ax.errorbar(x, i, xerr=err, fmt="o", color=color, ms=4, capsize=2, lw=1)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(c, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(models)), models, fontsize=7)
    axes[0][0].set_ylim(len(models) - 0.5, -0.5)
    fig.supxlabel(
        "held-out BPB change vs the public anchor, % (left of 0: better)"
        + (", whiskers: paired 95% interval" if ivs else f" — {NO_INTERVALS}"),
        fontsize=8,
    )
    save(fig, "main.png")
    return True


def rebuild(run_dir: Path) -> Path:
    """`flexmoe report RUN_DIR`: report.md and plots from RUN_DIR/report/results.json."""
    res = Path(run_dir) / "report" / "results.json"
    if not res.is_file():
        raise FlexmoeError(f"no results at {res} (run the demo or an evaluation first)")
    results = json.loads(res.read_text())
    if results.get("windows"):  # recomputed (seeded): comparisons added since are judged too
        seq_len = (results.get("config") or {}).get("seq_len")
        results["intervals"] = iv.demo_intervals(results["windows"], results["domains"], seq_len)
        write_json(res, results)
    tasks = res.parent / "tasks.json"  # per-document task results: tasks.md re-rendered
    if tasks.is_file():
        t = json.loads(tasks.read_text())
        (res.parent / "tasks.md").write_text(tasks_md(t["results"], t["limit"]))
    return write_report(results, res.parent)
