"""Router-tuning proxies chosen by relevance (the default) vs relevance + diversity (issue 23,
after MetaMoE), at the same budget, on a finished results run (`make results PART=2`).

    python scripts/proxy_selection.py --run runs/results-smollm2 --out results/router-tuning

Builds RUN/router-tuned-diverse/ (each owner's proxies by `select_proxies(selection="diverse")`,
then the same router tuning as the run's, same steps, seed and public sample), scores it on the
run's held-out windows like the report scores the relevance-tuned model (bf16 autocast, token
routing over all experts, no preselection), and writes selection.md / selection.json: BPB with 95%
intervals per domain and paired differences (diverse − relevance, each − the un-tuned merged
model) with the report's verdicts. The relevance-tuned and un-tuned rows are the run's own
(report/results.json); stages are reused when rerun.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

MERGED = "FlexOlmo merged"
RELEVANCE = "FlexOlmo merged + router tuning"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/results-smollm2"))
    ap.add_argument("--out", type=Path, default=Path("results/router-tuning"))
    args = ap.parse_args()

    import torch

    from flexmoe.data.shards import TokenStream
    from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
    from flexmoe.demo.config import DemoConfig
    from flexmoe.demo.stages import router_tune_stage
    from flexmoe.evaluation import intervals as iv
    from flexmoe.inference.bpb import evaluate_bpb
    from flexmoe.store.merged import load_merged

    t0 = time.perf_counter()
    cfg = DemoConfig.results(2, out=args.run)
    cfg.rt_selection = "diverse"
    res = json.loads((args.run / "report" / "results.json").read_text())
    windows = res["windows"]
    if RELEVANCE not in windows:
        raise SystemExit(f"{args.run}: no router-tuned row in report/results.json (PART=2 first)")
    tuned_dir = router_tune_stage(cfg, {}, args.run / "merged")
    t_tune = time.perf_counter() - t0

    domains = list(windows[RELEVANCE])
    tok = load_tokenizer(args.run / "anchor")
    tb = token_byte_lengths(tok)
    model = load_merged(tuned_dir)
    diverse = {}
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.eval_bf16 else nullcontext()
    with torch.no_grad(), ctx:
        for d in domains:
            r = evaluate_bpb(
                lambda ids: model(ids).logits,
                TokenStream(args.run / "tokens" / d / "heldout"),
                tb,
                cfg.seq_len,
                max_tokens=cfg.eval_tokens,
            )
            diverse[d] = r["windows"]
    rows = {
        "merged, no router tuning": windows[MERGED],
        "router tuning, relevance proxies (default)": windows[RELEVANCE],
        "router tuning, diverse proxies": diverse,
    }
    overlap = {}
    for d in cfg.domains:
        a = json.loads((args.run / "router-tuned" / "proxies" / f"{d}.json").read_text())["ids"]
        b = json.loads((tuned_dir.parent / "proxies" / f"{d}.json").read_text())["ids"]
        overlap[d] = len(set(a) & set(b))

    table = {}
    for label, w in rows.items():
        cells = {d: {"bpb": iv.bpb_of(w[d]), "ci": iv.bpb_ci(w[d])} for d in domains}
        point = sum(c["bpb"] for c in cells.values()) / len(cells)
        cells["mean"] = {"bpb": point, "ci": iv.mean_ci({d: w[d] for d in domains})}
        table[label] = cells
    labels = list(rows)
    diffs = {}
    for a, b in ((labels[2], labels[1]), (labels[1], labels[0]), (labels[2], labels[0])):
        cmp = {d: iv.paired_diff(rows[a][d], rows[b][d]) for d in domains}
        cmp["mean"] = iv.paired_mean_diff(
            {d: rows[a][d] for d in domains}, {d: rows[b][d] for d in domains}
        )
        diffs[f"{a} − {b}"] = cmp

    cols = [*domains, "mean"]
    md = [
        f"# Router-tuning proxies: relevance vs diverse selection ({args.run})",
        "",
        f"{cfg.rt_proxies} public proxies per owner from the same 1,000-document public sample; "
        f"{cfg.rt_steps} router-tuning steps; held-out BPB (lower is better), "
        f"{cfg.eval_tokens:,} tokens per domain, 95% bootstrap intervals over windows. Proxies "
        "shared by the two selections: "
        + ", ".join(f"{d} {n}/{cfg.rt_proxies}" for d, n in overlap.items())
        + ".",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, cells in table.items():
        md.append(
            f"| {label} | "
            + " | ".join(
                f"{cells[c]['bpb']:.3f} [{cells[c]['ci'][0]:.3f}, {cells[c]['ci'][1]:.3f}]"
                for c in cols
            )
            + " |"
        )
    md += ["", "| difference (A − B) | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, cmp in diffs.items():
        md.append(
            f"| {name} | "
            + " | ".join(
                f"{100 * cmp[c]['rel']:+.1f}% [{100 * cmp[c]['rel_lo']:+.1f}%, "
                f"{100 * cmp[c]['rel_hi']:+.1f}%]"
                for c in cols
            )
            + " |"
        )
    verdicts = {n: iv.verdict(c["mean"]["lo"], c["mean"]["hi"]) for n, c in diffs.items()}
    md.append("")
    for n, v in verdicts.items():
        a, b = n.split(" − ")
        md.append(f"- {a} better than {b}, on the mean: {v}.")
    md += ["", f"Router tuning {t_tune:.0f} s, total {time.perf_counter() - t0:.0f} s."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selection.md").write_text("\n".join(md) + "\n")
    (args.out / "selection.json").write_text(
        json.dumps(
            {"table": table, "diffs": diffs, "verdicts": verdicts, "overlap": overlap}, indent=1
        )
    )
    print("\n".join(md))


if __name__ == "__main__":
    main()
