"""Training throughput of the shared loop: dense anchor (fp32, bf16) vs expert training
(2-expert FlexOlmo, only the owner's FFN/router/bias trained), measured in one run.

    python scripts/bench_train.py                 # demo preset, 2 threads
    python scripts/bench_train.py --preset 1b --steps 200 --device cuda   # on a GPU
    python scripts/bench_train.py --anchor runs/demo/anchor --batch-size 4 \
        --only dense-bf16,expert-bf16,expertneg-bf16         # a real anchor (make demo's)

Prints tokens/s per configuration (the first `--warmup` steps are excluded), each expert
configuration's ratio to dense at the same precision beside its FLOP-ideal, and, on CUDA, MFU.
`expertneg` adds the flexmoe recipe's public negatives (one public row per four owner rows, gate
loss; their tokens are not counted as training tokens). `expertlr` trains the owner's FFN as a
rank-`--rank` delta on the frozen anchor FFN (`expert train --rank`, model/lowrank.py).
FLOP-ideal per token, with F_a the
matmul FLOPs outside the FFNs (attention, lm_head) and F_f one FFN's: dense 3(F_a + F_f); expert
2F_a + 5F_f (forward with both FFNs, activation gradients through everything, weight gradients
of the owner's FFN only); low rank 2F_a + 4F_f (+ the rank-r terms); a public-negative row
2F_a + 4F_f (no FFN weight gradients).
Token ids are random: throughput does not depend on the text.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def fake_shards(root: Path, vocab: int, n_tokens: int) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, vocab, size=n_tokens, dtype=np.uint16 if vocab <= 65536 else np.uint32)
    arr.tofile(root / "shard_00000.bin")
    (root / "index.json").write_text(
        json.dumps(
            {
                "dtype": arr.dtype.name,
                "shards": [{"file": "shard_00000.bin", "tokens": n_tokens}],
                "tokenizer_sha256": "",
                "vocab_size": vocab,
                "eos_token_id": 0,
            }
        )
    )
    return root


def flops_per_token(config, seq_len: int) -> tuple[float, float]:
    """(F_a, F_f): matmul FLOPs per token outside the FFNs, and of one FFN (all layers)."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    proj = 2 * (h * q + 2 * h * kv + q * h)
    scores = 2 * 2 * (seq_len / 2) * q  # QK^T and AV, causal: half the keys on average
    return L * (proj + scores) + 2 * h * config.vocab_size, L * 2 * 3 * h * i


def ideal_ratio(kind: str, fa: float, ff: float, public_ratio: float = 0.25) -> float:
    dense = 3 * (fa + ff)
    expert = 2 * fa + (4 if kind == "expertlr" else 5) * ff  # low rank: no FFN weight gradient
    if kind == "expertneg":
        expert += public_ratio * (2 * fa + 4 * ff)
    return dense / expert


def bench(
    model, stream, cfg, steps: int, warmup: int, masks=None, device="cpu", pre_step=None
) -> float:
    from flexmoe.train.loop import get_batch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ctx = (
        torch.autocast(device, dtype=torch.bfloat16)
        if cfg.bf16
        else torch.autocast(device, enabled=False)
    )
    t0 = None
    for step in range(steps + warmup):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if pre_step is not None:
            pre_step(model, step, ctx)
        batch = get_batch(stream, cfg, step, 0).to(device)
        with ctx:
            logits = model(batch[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
        for p, m in masks or []:
            if p.grad is not None:
                p.grad.mul_(m)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)


def main() -> None:
    import copy

    from flexmoe.data.shards import TokenStream
    from flexmoe.lifecycle.expert import build_two_expert, freeze_for_expert
    from flexmoe.lifecycle.gate import PublicNegatives
    from flexmoe.model.dense import PRESETS, new_anchor, olmo2_config
    from flexmoe.store.anchor_dir import load_anchor
    from flexmoe.train.loop import TrainConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--anchor", type=Path, help="a real anchor directory instead of a preset")
    ap.add_argument("--batch-size", type=int, help="default: the preset's")
    ap.add_argument("--seq-len", type=int, help="default: the preset's")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--only", default="dense-fp32,dense-bf16,expert-fp32,expert-bf16")
    ap.add_argument("--rank", type=int, default=128, help="expertlr: the owner's delta rank")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = PRESETS[args.preset]
    batch_size, seq_len = args.batch_size or p.batch_size, args.seq_len or p.seq_len
    dev = args.device
    if args.anchor is not None:
        base, _, extras = load_anchor(args.anchor)
        label = f"anchor {args.anchor} ({base.config.model_type})"
    else:
        base = new_anchor(olmo2_config(args.preset, args.vocab, 0, 1), seed=0)
        L, H = p.num_hidden_layers, p.hidden_size
        extras = {"public.domain": torch.randn(L, H) * 0.02}
        label = f"preset {args.preset}"
    cfg0 = base.config
    fa, ff = flops_per_token(cfg0, seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        stream = TokenStream(fake_shards(Path(tmp), cfg0.vocab_size, 2_000_000))
        print(
            f"{label}: hidden {cfg0.hidden_size}, layers {cfg0.num_hidden_layers}, "
            f"batch {batch_size}×{seq_len}, device {dev}, threads {args.threads}; "
            f"per token F_a {fa / 1e6:.0f} MFLOP, F_f {ff / 1e6:.0f} MFLOP"
        )
        results = {}
        for name in args.only.split(","):
            kind, prec = name.split("-")
            cfg = TrainConfig(steps=1, batch_size=batch_size, seq_len=seq_len, bf16=prec == "bf16")
            anchor = copy.deepcopy(base)
            masks, pre = None, None
            if kind == "dense":
                model = anchor
                n_params = sum(x.numel() for x in model.parameters())
            if kind in ("expert", "expertneg", "expertlr"):
                L, H = cfg0.num_hidden_layers, cfg0.hidden_size
                rows = torch.randn(L, H, generator=torch.Generator().manual_seed(1)) * 0.02
                model = build_two_expert(anchor, extras, rows, "domain")
                fmasks = freeze_for_expert(model)
                named = dict(model.named_parameters())
                masks = [(named[k], m) for k, m in fmasks.items()]
                n_params = sum(x.numel() for x in anchor.parameters())  # per-token: both FFNs
                if kind == "expertlr":
                    from flexmoe.model.lowrank import low_rank_owner

                    low_rank_owner(model, args.rank, owner=1, seed=0)
                if kind == "expertneg":
                    pre = PublicNegatives(stream, max(1, round(batch_size / 4)), seq_len, 0, 1.0)
            model.to(dev)
            masks = [(pp, m.to(dev)) for pp, m in masks or []]
            tps = bench(model, stream, cfg, args.steps, args.warmup, masks, dev, pre)
            results[name] = tps
            line = f"{name:15s} {tps:10,.0f} tokens/s"
            dense = results.get(f"dense-{prec}")
            if kind != "dense" and dense:
                line += (
                    f"   {tps / dense:.2f}× dense-{prec} (FLOP-ideal "
                    f"{ideal_ratio(kind, fa, ff):.2f}×)"
                )
            if dev == "cuda":
                peak = 989e12 if "H100" in torch.cuda.get_device_name() else 989e12
                line += f"   MFU {6 * n_params * tps / peak:.1%} (6·N·tokens/s over bf16 peak)"
            print(line, flush=True)
            del model


if __name__ == "__main__":
    main()
