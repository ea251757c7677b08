"""`make demo`: the whole FlexOlmo lifecycle on FlexMix-mini (see flexmoe.demo.pipeline).

python scripts/demo.py            # SmolLM2-135M anchor, 4 experts, ≤ 40 min on 2 cores → runs/demo/
python scripts/demo.py --scratch  # OLMo-2 anchor trained from scratch, ~10 min → runs/demo-scratch/
python scripts/demo.py --full     # SmolLM2, 7 domains, ablations, RT, tasks → runs/demo-full/
python scripts/demo.py --results  # SmolLM2, the evidence run (part 1) → runs/results-smollm2/
python scripts/demo.py --smoke    # tiny models, for checking the plumbing → runs/demo-smoke/
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path("results/smollm2")  # where --results commits its report, JSON and plots


def main() -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from flexmoe.demo.config import PARTS, DemoConfig
    from flexmoe.demo.pipeline import run_demo
    from flexmoe.errors import FlexmoeError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--full", action="store_true", help="all 7 domains, every ablation, RT")
    kind.add_argument("--results", action="store_true", help="the evidence run (results/smollm2)")
    kind.add_argument("--smoke", action="store_true", help="tiny models (plumbing check)")
    kind.add_argument("--scratch", action="store_true", help="train the anchor from scratch")
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also train the ablations (router init, no bias, no coordination, unrestricted MoE)",
    )
    p.add_argument("--rt", action="store_true", help="also run router tuning on public proxies")
    p.add_argument("--tasks", action="store_true", help="also run downstream tasks")
    p.add_argument("--task-limit", type=int, help="documents per task (default 100)")
    p.add_argument("--out", type=Path, help="run directory")
    p.add_argument("--part", type=int, default=1, help="with --results: the part (1-4)")
    p.add_argument(
        "--until", choices=["models"], help="stop once the models are trained and merged"
    )
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    hf_logging.disable_progress_bar()
    if args.full:
        cfg = DemoConfig.full()
    elif args.smoke:
        cfg = DemoConfig(
            out=Path("runs/demo-smoke"),
            anchor_preset="tiny",
            anchor_steps=60,
            expert_steps=20,
            seq_len=64,
            batch_size=8,
            router_docs=16,
            eval_tokens=2048,
            vocab_size=1024,
            expert_lr=1e-2,
            dense_lr=3e-3,
            control=True,
        )
    elif args.results:
        if args.part not in PARTS:
            p.error(f"--part must be one of {', '.join(map(str, PARTS))}")
        cfg = DemoConfig.results(args.part)
    elif args.scratch:
        cfg = DemoConfig.scratch()
    else:
        cfg = DemoConfig.pretrained()
    if args.out:
        cfg.out = args.out
    cfg.ablations = cfg.ablations or args.ablations
    cfg.router_tuning = cfg.router_tuning or args.rt
    cfg.tasks = cfg.tasks or args.tasks
    if args.task_limit is not None:
        if args.task_limit < 1:
            p.error("--task-limit must be at least 1")
        cfg.task_limit = args.task_limit
    from flexmoe.demo.export import code_commit

    t0, commit = time.perf_counter(), code_commit()  # the code that runs, not the code at the end
    try:
        run_demo(cfg, until=args.until)
    except FlexmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.results and args.until is None:  # the committed evidence (small files only)
        from flexmoe.demo.export import export_results

        command = f"make results PART={args.part}"
        dest = export_results(
            cfg.out / "report", RESULTS, command, time.perf_counter() - t0, commit
        )
        print(f"results → {dest}", file=sys.stderr)
    if args.full:  # the privacy section: math owner (scripts/privacy_table.py)
        import subprocess

        script = Path(__file__).with_name("privacy_table.py")
        cmd = [sys.executable, str(script), "--run", str(cfg.out), "--domain", "math"]
        return subprocess.call(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
