"""Median time to enter and leave a request's expert choice (model.routing) on a demo-size model.

No reload and no weight change: a request's mask is thread-local routing state, so switching
should cost microseconds. Target: < 1 ms. Usage: python scripts/bench_switch.py [--calls N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flexmoe.model.dense import new_anchor, olmo2_config
from flexmoe.model.moe import upcycle
from flexmoe.model.router import routing
from flexmoe.selection import expert_mask
from flexmoe.store.merged import experts_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--experts", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = olmo2_config("demo", vocab_size=8192, eos_token_id=0, pad_token_id=1)  # H256, 4 layers
    model = upcycle(new_anchor(cfg, seed=0), args.experts, min(args.experts, 4)).eval()
    experts_of(model).names = ["public"] + [f"e{i}" for i in range(1, args.experts)]
    masks = [torch.ones(args.experts, dtype=torch.bool), expert_mask(model, exclude=["e1", "e3"])]
    times, named = [], []
    for i in range(args.calls):
        m = masks[i % 2]
        t0 = time.perf_counter()
        with routing(model, mask=m):
            pass
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with routing(model, mask=expert_mask(model, exclude=["e2"] if i % 2 else None)):
            pass
        named.append(time.perf_counter() - t0)
    print(
        f"model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{args.experts} experts; {args.calls} switches"
    )
    print(
        f"routing(mask) enter+exit: median {statistics.median(times) * 1e6:.1f} µs, "
        f"p99 {sorted(times)[int(0.99 * len(times))] * 1e6:.1f} µs"
    )
    print(f"expert_mask(names) + routing: median {statistics.median(named) * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
