"""Which expert preselection SHOULD pick: each held-out window scored with public + every single
expert, so the picks of each scoring method are judged by the BPB they give, not by the domain
label alone (issue 23: the anchor's hidden states pick the labelled domain more often than MiniLM,
yet held-out math BPB got worse).

    python scripts/preselect_oracle.py --run runs/results-smollm2 \
        --merged runs/results-smollm2/merged-centroid --domains math --out results/preselect/oracle

For each window of the report's held-out windows (its eval_tokens, seq_len, preselection context,
bf16 autocast): the BPB under public + e for each expert e, the expert each method picks from the
context before the window (MiniLM, the anchor's hidden states, both), and the best expert in
hindsight ("oracle"). Prints and writes oracle.md / oracle.json: per domain and method, how often
it picks the labelled domain and the oracle's expert, and its BPB with a 95% interval of the
difference to MiniLM alone (paired over windows). `--merged` must store hidden centroids
(`expert centroid`, `merge --preselect-hidden`). Windows with no text before them (the first) are
left out: preselection keeps every expert there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/results-smollm2"))
    ap.add_argument("--merged", type=Path, required=True)
    ap.add_argument("--domains", nargs="+", default=None, help="default: all held-out domains")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import numpy as np
    import torch

    from flexmoe.data.shards import TokenStream
    from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
    from flexmoe.evaluation import intervals as iv
    from flexmoe.inference.bpb import eval_windows, evaluate_bpb
    from flexmoe.inference.preselect import combined_scores, hidden_scores, minilm_scores
    from flexmoe.model.router import routing
    from flexmoe.selection import expert_mask, expert_names
    from flexmoe.store.merged import load_merged

    t0 = time.perf_counter()
    cfg = json.loads((args.run / "report" / "results.json").read_text())["config"]
    seq, ctx_len, budget = cfg["seq_len"], cfg["preselect_context"], cfg["eval_tokens"]
    domains = args.domains or ["public", *cfg["domains"]]
    tok = load_tokenizer(args.merged)
    tb = token_byte_lengths(tok)
    model = load_merged(args.merged)
    names = expert_names(model)
    owners = [i for i, n in enumerate(names) if i > 0]
    report: dict[str, dict] = {}
    for d in domains:
        s = TokenStream(args.run / "tokens" / d / "heldout")
        starts = eval_windows(s, seq, budget)
        keep = [j for j, x in enumerate(starts) if x > 0]
        texts = [
            tok.decode(s.window(max(x - ctx_len, 0), min(x, ctx_len)).tolist()) for x in starts
        ]
        texts = [texts[j] for j in keep]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            per_expert = {}
            for e in owners:
                with routing(model, mask=expert_mask(model, include=[names[e]])):
                    w = evaluate_bpb(lambda ids: model(ids).logits, s, tb, seq, max_tokens=budget)
                per_expert[names[e]] = [w["windows"][j] for j in keep]
            mini = minilm_scores(model, texts, owners)
            hid = hidden_scores(model, tok, texts, owners)
        scores = {"MiniLM": mini, "hidden": hid, "MiniLM + hidden": combined_scores(mini, hid)}
        owner_names = [names[e] for e in owners]
        bpw = np.array([[nll / b for nll, b in per_expert[n]] for n in owner_names])  # (E, W)
        oracle = bpw.argmin(0)
        picks = {k: v.argmax(-1).numpy() for k, v in scores.items()}
        picks["oracle"] = oracle

        def windows_of(p, per_expert=per_expert, owner_names=owner_names):
            return [per_expert[owner_names[e]][j] for j, e in enumerate(p)]

        base = windows_of(picks["MiniLM"])
        rows = {}
        for k, p in picks.items():
            w = windows_of(p)
            lo, hi = iv.bpb_ci(w)
            c = iv.paired_diff(w, base)
            rows[k] = {
                "label_accuracy": float(np.mean([owner_names[e] == d for e in p])),
                "oracle_agreement": float(np.mean(p == oracle)),
                "bpb": iv.bpb_of(w),
                "ci": [lo, hi],
                "vs_minilm": [c["rel"], c["rel_lo"], c["rel_hi"]],
                "picked": {n: int((p == i).sum()) for i, n in enumerate(owner_names)},
            }
        report[d] = {"windows": len(keep), "methods": rows}
        print(d, json.dumps({k: round(v["bpb"], 4) for k, v in rows.items()}), flush=True)

    md = [
        f"# Preselection judged by BPB: {args.merged}",
        "",
        f"Each of {args.run}'s held-out windows ({budget:,} tokens per domain, {seq}-token "
        f"windows, the first left out) scored with public + each single expert (bf16 autocast); "
        f"each method picks from the {ctx_len} tokens before the window; the oracle picks the "
        "best expert in hindsight. 95% bootstrap intervals over windows, the difference to "
        "MiniLM paired. Command: `python scripts/preselect_oracle.py --run "
        f"{args.run} --merged {args.merged}"
        + (" --domains " + " ".join(domains) if args.domains else "")
        + " --out OUT`.",
        "",
        "| domain | method | picks the domain | picks the oracle's | BPB | Δ vs MiniLM | picked |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for d, r in report.items():
        for k, v in r["methods"].items():
            rel, lo, hi = (100 * x for x in v["vs_minilm"])
            picked = ", ".join(f"{n} {c}" for n, c in v["picked"].items() if c)
            md.append(
                f"| {d} | {k} | {v['label_accuracy']:.2f} | {v['oracle_agreement']:.2f} | "
                f"{v['bpb']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] | "
                f"{rel:+.1f}% [{lo:+.1f}%, {hi:+.1f}%] | {picked} |"
            )
    md += ["", f"{time.perf_counter() - t0:.0f} s."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "oracle.md").write_text("\n".join(md) + "\n")
    (args.out / "oracle.json").write_text(json.dumps(report, indent=2))
    print("\n".join(md))


if __name__ == "__main__":
    main()
