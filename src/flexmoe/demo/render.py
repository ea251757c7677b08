"""The demo's report from its measured results (flexmoe.evaluation.demo_eval): the main table,
opt-out, router tuning, recipes side by side, ablations, per-source BPB, top-k, router
embeddings, a generation with attribution, plots and the downstream-tasks table.

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
from flexmoe.errors import FlexmoeError
from flexmoe.store.fsutil import atomic_file, write_json


def _fmt(v: float) -> str:
    return "–" if v != v else f"{v:.3f}"  # NaN: not evaluated (lean evaluation)


ROW_ORDER = (
    "anchor",
    "dense expert",
    "model soup",
    "BTM",
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
    cols = [*results["domains"], "mean"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    best = {  # NaN: not evaluated (lean evaluation), never the best
        c: min((r[c] for r in results["main"].values() if r[c] == r[c]), default=None) for c in cols
    }
    for name in row_order(results["main"]):
        r = results["main"][name]
        cells = [f"**{_fmt(r[c])}**" if r[c] == best[c] else _fmt(r[c]) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_main_table(results: dict) -> None:
    cols = [*results["domains"], "mean"]
    t = Table(title="held-out bits per byte (lower is better)")
    t.add_column("model")
    for c in cols:
        t.add_column(c, justify="right")
    for name in row_order(results["main"]):
        t.add_row(name, *[_fmt(results["main"][name][c]) for c in cols])
    Console().print(t)
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
        "## Main table",
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
        for d, r in results["optout_rt"].items():
            md.append(
                f"| {d}, RT | "
                + " | ".join(f"{_fmt(r[c])} ({r[c] - tuned[c]:+.3f})" for c in cols)
                + " |"
            )
    md += selectivity_md(results)
    nb = results["no_bias"]
    md += [
        "",
        "## Ablation: router bias",
        "",
        "Stock transformers' FlexOlmo has no router bias; the stock-loadable export runs "
        "with b = 0.",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        "| with bias (flexmoe loader) | " + " | ".join(_fmt(full[c]) for c in cols) + " |",
        "| without bias (stock load) | " + " | ".join(_fmt(nb[c]) for c in cols) + " |",
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
    if "renormalize" in results:
        rn = results["selectivity"][next(iter(results["selectivity"]))]["variants"].get("renorm")
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
        ]
        if rn:
            md.append(
                f"| {'not renormalised' if results['renormalize'] else 'renormalised'} | "
                + " | ".join(_fmt(rn[c]) for c in cols)
                + " |"
            )
        md.append("")
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

    def heatmap(mat, rows, cols, cmap, fmt, label, title, name, **kw) -> None:
        fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 0.6 * len(rows) + 1.5))
        im = ax.imshow(mat, cmap=cmap, **kw)
        ax.set_xticks(range(len(cols)), cols, rotation=30)
        ax.set_yticks(range(len(rows)), rows)
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8)
        fig.colorbar(im, label=label)
        ax.set_title(title)
        save(fig, name)

    full = results["main"]["FlexOlmo merged"]
    optout = results["optout"]
    heatmap(
        np.array([[optout[e][d] - full[d] for d in doms] for e in optout]),
        [f"without {e}" for e in optout],
        doms,
        "Reds",
        "+.3f",
        "Δ BPB vs all experts",
        "opt-out: held-out BPB change",
        "optout.png",
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
    # main table bars
    models = row_order(results["main"])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(models) + 1.5))
    ax.barh(range(len(models)), [results["main"][m]["mean"] for m in models], color="tab:gray")
    ax.set_yticks(range(len(models)), models)
    ax.invert_yaxis()
    ax.set_xlabel("mean held-out BPB (lower is better)")
    save(fig, "main.png")
    return paths


def rebuild(run_dir: Path) -> Path:
    """`flexmoe report RUN_DIR`: report.md and plots from RUN_DIR/report/results.json."""
    res = Path(run_dir) / "report" / "results.json"
    if not res.is_file():
        raise FlexmoeError(f"no results at {res} (run the demo or an evaluation first)")
    return write_report(json.loads(res.read_text()), res.parent)


def tasks_md(results: dict[str, dict[str, dict[str, float]]], limit: int) -> str:
    """Table-1-style markdown: one row per model, one column per task (acc_norm for multiple
    choice, bits per byte of the gold answer for generative tasks)."""
    tasks = list(next(iter(results.values())))

    def cell(m: dict) -> str:
        v = m.get("acc_norm", m.get("acc", m.get("bits_per_byte")))
        return "–" if v is None else f"{v:.3f}"

    md = [
        "# Downstream tasks",
        "",
        f"`flexmoe eval tasks`, {limit} documents per task; multiple choice: acc_norm (higher is "
        "better), gold-answer tasks: bits per byte (lower is better).",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    md += [f"| {m} | " + " | ".join(cell(r[t]) for t in tasks) + " |" for m, r in results.items()]
    return "\n".join(md) + "\n"
