"""Held-out BPB of a merged model in its default mode against a row of a finished results run,
paired over the same windows: e.g. the same experts with hidden centroids added (`expert
centroid`), so preselection adds the anchor's hidden states to MiniLM (issue 23).

    python scripts/preselect_bpb.py --run runs/results-smollm2 \
        --merged runs/results-smollm2/merged-centroid --out results/preselect/bpb.md

`--against mean`: instead of the run's row, the same merged model with its packages' MiniLM
prototypes ignored (each expert scored by its mean document embedding, as before packages
stored prototypes), both scored here (`--eval-tokens` may then exceed the run's):

    python scripts/preselect_bpb.py --run runs/demo --merged runs/demo/merged --against mean \
        --eval-tokens 16384 --out results/preselect/prototypes-bpb.md

`--against no-bias`: the same merged model with every router bias set to 0 (what a stock
transformers loader computes), both in the model's default mode (its preselection).

Scoring as the run's report does it (its eval_tokens, seq_len, preselection context, bf16
autocast); writes a markdown table with 95% intervals and the paired differences.
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
    ap.add_argument("--row", default="FlexOlmo merged", help="the run's row to compare with")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--against", choices=["mean", "no-bias"], help="instead of the run's row")
    ap.add_argument("--eval-tokens", type=int, help="with --against (default: the run's)")
    args = ap.parse_args()

    import torch

    from flexmoe.data.shards import TokenStream
    from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
    from flexmoe.evaluation import intervals as iv
    from flexmoe.inference.bpb import evaluate_bpb
    from flexmoe.inference.preselect import default_preselect, preselect_hook
    from flexmoe.model.router import routers
    from flexmoe.store.merged import experts_of, load_merged

    t0 = time.perf_counter()
    res = json.loads((args.run / "report" / "results.json").read_text())
    cfg, base = res["config"], res["windows"][args.row]
    domains = list(base)
    if args.eval_tokens:
        if not args.against:
            ap.error("--eval-tokens needs --against (the run's row has the run's tokens)")
        cfg["eval_tokens"] = args.eval_tokens
    tok = load_tokenizer(args.merged)
    tb = token_byte_lengths(tok)
    model = load_merged(args.merged)
    pre = default_preselect(model)
    if args.against == "mean" and len(experts_of(model).domain_prototypes) < 2:
        ap.error(f"{args.merged}: its packages store no MiniLM prototypes to compare")

    def score() -> dict:
        out = {}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for d in domains:
                s = TokenStream(args.run / "tokens" / d / "heldout")
                hook = preselect_hook(model, tok, s, pre, cfg["preselect_context"]) if pre else None
                out[d] = evaluate_bpb(
                    lambda ids: model(ids).logits, s, tb, cfg["seq_len"],
                    max_tokens=cfg["eval_tokens"], before_batch=hook,
                )["windows"]  # fmt: skip
        return out

    new = score()
    if args.against == "mean":
        args.row = f"{args.merged}, each owner scored by its mean embedding"
        protos = dict(experts_of(model).domain_prototypes)
        experts_of(model).domain_prototypes.clear()  # minilm_scores falls back to the means
        base = score()
        experts_of(model).domain_prototypes.update(protos)
    elif args.against == "no-bias":
        args.row = f"{args.merged}, router biases 0"
        with torch.no_grad():
            for r in routers(model):
                r.bias.zero_()
        base = score()

    def cell(w) -> str:
        lo, hi = iv.bpb_ci(w)
        return f"{iv.bpb_of(w):.3f} [{lo:.3f}, {hi:.3f}]"

    def mean_cell(ws) -> str:
        lo, hi = iv.mean_ci(ws)
        return f"{sum(iv.bpb_of(w) for w in ws.values()) / len(ws):.3f} [{lo:.3f}, {hi:.3f}]"

    def rel(c) -> str:
        return f"{100 * c['rel']:+.1f}% [{100 * c['rel_lo']:+.1f}%, {100 * c['rel_hi']:+.1f}%]"

    diffs = {d: iv.paired_diff(new[d], base[d]) for d in domains}
    diffs["mean"] = iv.paired_mean_diff(new, base)
    cols = [*domains, "mean"]
    new_row, delta = str(args.merged), "new − run's row"
    if args.against == "mean":
        new_row, delta = f"{args.merged}, closest prototype", "prototypes − mean"
    elif args.against == "no-bias":
        new_row, delta = f"{args.merged}, learned biases", "biases − 0"
    md = [
        f"# {args.merged} vs '{args.row}' of {args.run}",
        "",
        f"Held-out BPB, {cfg['eval_tokens']:,} tokens per domain in {cfg['seq_len']}-token "
        f"windows, bf16 autocast, preselection {pre} reading the {cfg['preselect_context']} "
        "tokens before each window; 95% bootstrap intervals over windows, the difference paired.",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        f"| {args.row} | " + " | ".join(cell(base[d]) for d in domains)
        + f" | {mean_cell(base)} |",
        f"| {new_row} | " + " | ".join(cell(new[d]) for d in domains)
        + f" | {mean_cell(new)} |",
        f"| Δ ({delta}) | " + " | ".join(rel(diffs[c]) for c in cols) + " |",
        "",
        f"Mean: the new model better: {iv.verdict(diffs['mean']['lo'], diffs['mean']['hi'])}. "
        f"{time.perf_counter() - t0:.0f} s.",
    ]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
