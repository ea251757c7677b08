"""Which HF experts implementation flexmoe should use on this machine: eager, grouped_mm or
batched_mm.

    python scripts/bench_experts_impl.py            # demo-preset shapes, 1 + 4 experts, top-4

Times a forward pass (scoring, 8×256 tokens), a forward+backward (training) and greedy
generation with the KV cache, for each implementation on the same weights, and checks they agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def timeit(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from flexmoe.model.dense import new_anchor, olmo2_config
    from flexmoe.model.moe import upcycle
    from flexmoe.model.router import routers, routing

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    anchor = new_anchor(olmo2_config(args.preset, 8192, 0, 1), seed=0)
    model = upcycle(anchor, args.experts, args.top_k)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.add_(
                torch.randn(layer.mlp.experts.gate_up_proj.shape, generator=g) * 0.02
            )
        for r in routers(model):
            r.weight.normal_(0, 0.5, generator=g)
    ids = torch.randint(0, 8192, (8, 256), generator=g)
    prompt = ids[:1, :32]
    ref = ref_masked = None
    rows = torch.ones(ids.shape[0], args.experts, dtype=torch.bool)
    rows[::2, 2:] = False  # half the rows keep 2 experts (< top-k): the padded-row path
    print(
        f"{args.experts} experts, top-{args.top_k}, preset {args.preset}, "
        f"{args.threads} threads (median of {args.repeat})"
    )
    cfg = model.config
    gather = ids.numel() * args.top_k * 3 * cfg.intermediate_size * cfg.hidden_size * 4
    for impl in ("eager", "grouped_mm", "batched_mm"):
        if impl == "batched_mm" and gather > 4 * 2**30:  # it gathers every token's expert weights
            print(
                f"{impl:11s} skipped: gathers per-token expert weights, ~{gather / 2**30:.0f} GiB"
            )
            continue
        model.set_experts_implementation(impl)
        with torch.no_grad():
            out = model(ids).logits
            with routing(model, rows=rows):
                masked = model(ids).logits
        diff = 0.0 if ref is None else (out - ref).abs().max().item()
        diff_m = 0.0 if ref_masked is None else (masked - ref_masked).abs().max().item()
        ref = out if ref is None else ref
        ref_masked = masked if ref_masked is None else ref_masked

        def fwd():
            with torch.no_grad():
                model(ids)

        def fwd_bwd():
            model(ids).logits.float().mean().backward()
            model.zero_grad(set_to_none=True)

        def gen():
            with torch.no_grad():
                model.generate(
                    prompt,
                    max_new_tokens=64,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=1,
                    eos_token_id=None,
                )

        f, fb, gn = timeit(fwd, args.repeat), timeit(fwd_bwd, args.repeat), timeit(gen, 2)
        print(
            f"{impl:11s} forward {ids.numel() / f:8,.0f} tok/s   fwd+bwd {ids.numel() / fb:8,.0f}"
            f" tok/s   generate {64 / gn:6,.1f} tok/s   max|Δlogits| vs eager {diff:.1e}"
            f" (masked rows {diff_m:.1e})"
        )
    model.set_experts_implementation("eager")


if __name__ == "__main__":
    main()
