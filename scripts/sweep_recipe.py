"""Try one expert-training recipe on a finished demo run's anchor and data, and print the merge's
selectivity numbers: public BPB vs the anchor, retention per domain, routing diagonal.

python scripts/sweep_recipe.py --run runs/demo --out runs/sweep/paper --recipe paper
python scripts/sweep_recipe.py --run runs/demo --out runs/sweep/g2 --gate-weight 2

Reuses the run's anchor, token shards and (for the soup comparison) report/results.json. Experts
are trained with the demo's expert settings (steps, lr, batch, seq len, seed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    import torch

    from flexmoe.demo.config import DemoConfig
    from flexmoe.evaluation.demo_eval import selectivity_summary
    from flexmoe.lifecycle.expert import calibrate_package, make_recipe, train_expert
    from flexmoe.lifecycle.merge import merge

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/demo"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--recipe", default="flexmoe")
    p.add_argument("--public-ratio", type=float)
    p.add_argument("--gate-weight", type=float)
    p.add_argument("--bias-init", type=float)
    p.add_argument("--owner-gate-weight", type=float)
    p.add_argument("--router-lr-scale", type=float)
    p.add_argument("--bias", choices=["softplus", "clamp"])
    p.add_argument("--no-train-bias", action="store_true", help="keep b at its start value")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--calibrate-public-weight", type=float)
    p.add_argument("--calibrate-windows", type=int)
    p.add_argument("--context", type=int, help="tokens of context preselection reads")
    p.add_argument(
        "--calibrate-from", type=Path, help="re-calibrate this sweep's packages instead of training"
    )
    p.add_argument("--router-z-loss", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--domains", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cfg = DemoConfig(out=args.run)
    if args.context:
        cfg.preselect_context = args.context
    if args.steps:
        cfg.expert_steps = args.steps
    domains = args.domains or cfg.domains
    rec = make_recipe(
        args.recipe,
        public_ratio=args.public_ratio,
        gate_weight=args.gate_weight,
        bias_init=args.bias_init,
        owner_gate_weight=args.owner_gate_weight,
        router_lr_scale=args.router_lr_scale,
        bias=args.bias,
        calibrate=args.calibrate,
        calibrate_public_weight=args.calibrate_public_weight,
        calibrate_windows=args.calibrate_windows,
        router_z_loss=args.router_z_loss,
    )
    tokens, anchor = args.run / "tokens", args.run / "anchor"
    t0 = time.perf_counter()
    pkgs = []
    for d in domains:
        out = args.out / "experts" / d
        if args.calibrate_from and not (out / "manifest.json").is_file():
            calibrate_package(
                anchor,
                args.calibrate_from / "experts" / d,
                tokens / d / "train",
                tokens / "public" / "train",
                out,
                rec,
                seq_len=cfg.seq_len,
                seed=cfg.seed,
            )
        elif not (out / "manifest.json").is_file():
            train_expert(
                anchor,
                tokens / d / "train",
                out,
                d,
                domain=d,
                router_docs=cfg.router_docs,
                lr=cfg.expert_lr,
                recipe=rec,
                public=tokens / "public" / "train",
                train_bias=not args.no_train_bias,
                **cfg.expert_kwargs(),
            )
        pkgs.append(out)
    t_train = time.perf_counter() - t0
    merge(anchor, pkgs, args.out / "merged", log=None)
    cfg.domains = domains
    summary = selectivity_summary(cfg.eval_settings(), anchor, args.out / "merged", tokens)
    res_path = args.run / "report" / "results.json"
    if res_path.is_file():
        main = json.loads(res_path.read_text())["main"]
        for k in ("model soup (uniform)", "model soup (weighted)", "BTM (top-2 ensemble)"):
            if k in main:
                summary["baselines"][k] = {d: main[k][d] for d in ["public", *domains]}
    summary["recipe"] = rec.model_dump()
    summary["train_seconds"] = t_train
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "routing"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
