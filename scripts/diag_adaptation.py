"""How much can one domain's data move a model when only some parameters train?

FlexOlmo's expert may change only its own FFN, router embedding and bias; embeddings, attention,
norms and the lm_head stay the anchor's. The dense-expert baselines (and so model soup and BTM)
train everything. This script trains, from one demo run's anchor and for the same steps on the
same domain, the variants below and prints each one's final training loss and held-out BPB:

    expert      the FlexOlmo expert (2-expert MoE; owner FFN + router row + bias)
    ffn-only    the dense anchor with only its FFNs trainable (no router at all)
    no-ffn      the dense anchor with everything BUT its FFNs trainable
    dense       the dense expert baseline (all parameters)

    python scripts/diag_adaptation.py --run runs/demo --domain math --steps 40

If `expert` ≈ `ffn-only`, the router costs nothing and the gap to `dense` is what freezing the
shared parameters costs at this scale.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch


def main() -> int:
    from transformers.utils import logging as hf_logging

    from flexmoe.data.shards import TokenStream
    from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
    from flexmoe.inference.bpb import evaluate_bpb
    from flexmoe.lifecycle.expert import expert_train_config, train_expert
    from flexmoe.lifecycle.merge import merge
    from flexmoe.store.anchor_dir import load_anchor
    from flexmoe.store.merged import load_merged
    from flexmoe.train.loop import train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/demo"))
    p.add_argument("--domain", default="math")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--expert-lr", type=float, default=3e-3, help="expert and ffn-only")
    p.add_argument("--dense-lr", type=float, default=1e-3, help="dense and no-ffn")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--variants", default="expert,ffn-only,no-ffn,dense")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    hf_logging.disable_progress_bar()

    anchor_dir, tokens = args.run / "anchor", args.run / "tokens"
    train_dir = tokens / args.domain / "train"
    tb = token_byte_lengths(load_tokenizer(anchor_dir))
    heldout = {d: TokenStream(tokens / d / "heldout") for d in ("public", args.domain)}
    common = dict(
        steps=args.steps,
        warmup=max(1, args.steps // 10),
        bf16=True,
        batch_size=16,
        seq_len=256,
        seed=0,
    )

    def bpb(model) -> dict[str, float]:
        with torch.no_grad():
            return {
                d: evaluate_bpb(
                    lambda ids: model(ids).logits, s, tb, 256, max_tokens=args.eval_tokens
                )["bpb"]
                for d, s in heldout.items()
            }

    def last_loss(work: Path) -> float:
        rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r][-1]

    print(f"{args.domain}, {args.steps} steps of 16×256 tokens, from {anchor_dir}")
    head = ("variant", "params", "train loss", "public bpb", "own bpb")
    print("{:10s} {:>10s} {:>10s} {:>10s} {:>8s}".format(*head))
    anchor = load_anchor(anchor_dir)[0]
    r = bpb(anchor)
    print(f"{'anchor':10s} {'-':>10s} {'-':>10s} {r['public']:10.3f} {r[args.domain]:8.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for v in args.variants.split(","):
            work = tmp / f"{v}.train"
            if v == "expert":
                pkg = tmp / v
                train_expert(
                    anchor_dir,
                    train_dir,
                    pkg,
                    args.domain,
                    router_docs=200,
                    lr=args.expert_lr,
                    eval_tokens=args.eval_tokens,
                    **common,
                )
                merge(anchor_dir, [pkg], tmp / "merged", log=None)
                model, n = load_merged(tmp / "merged"), 0
                for name, t in model.named_parameters():
                    n += t[1].numel() if ".mlp." in name else 0  # the owner's slice only
            elif v in ("ffn-only", "no-ffn", "dense"):
                model = load_anchor(anchor_dir)[0]
                for name, t in model.named_parameters():
                    is_ffn = ".mlp." in name
                    t.requires_grad_({"ffn-only": is_ffn, "no-ffn": not is_ffn}.get(v, True))
                n = sum(t.numel() for t in model.parameters() if t.requires_grad)
                lr = args.expert_lr if v == "ffn-only" else args.dense_lr
                cfg = expert_train_config(lr=lr, **common)
                train(model, TokenStream(train_dir), cfg, work, progress_label=v)
            else:
                raise SystemExit(f"unknown variant '{v}'")
            r = bpb(model.eval())
            print(
                f"{v:10s} {n:10,d} {last_loss(work):10.3f} {r['public']:10.3f} "
                f"{r[args.domain]:8.3f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
