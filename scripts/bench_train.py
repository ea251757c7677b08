"""Training throughput of the shared loop: dense anchor (fp32, bf16) vs expert training
(2-expert FlexOlmo, only the owner's FFN/router/bias trained), measured in one run.

    python scripts/bench_train.py                 # demo preset, 2 threads
    python scripts/bench_train.py --preset 1b --steps 200 --device cuda   # on a GPU

Prints tokens/s per configuration (the first `--warmup` steps are excluded) and, on CUDA, MFU.
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
            }
        )
    )
    return root


def bench(model, stream, cfg, steps: int, warmup: int, masks=None, device="cpu") -> float:
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
        batch = get_batch(stream, cfg, step, 0).to(device)
        with ctx:
            logits = model(batch[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
        for p, m in masks or []:
            p.grad.mul_(m)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)


def main() -> None:
    from flexmoe.data.shards import TokenStream
    from flexmoe.lifecycle.expert import build_two_expert, freeze_for_expert
    from flexmoe.model.dense import PRESETS, new_anchor, olmo2_config
    from flexmoe.train.loop import TrainConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--only", default="dense-fp32,dense-bf16,expert-fp32,expert-bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = PRESETS[args.preset]
    dev = args.device
    with tempfile.TemporaryDirectory() as tmp:
        stream = TokenStream(fake_shards(Path(tmp), args.vocab, 2_000_000))
        print(
            f"preset {args.preset}: hidden {p.hidden_size}, layers {p.num_hidden_layers}, "
            f"batch {p.batch_size}×{p.seq_len}, device {dev}, threads {args.threads}"
        )
        results = {}
        for name in args.only.split(","):
            kind, prec = name.split("-")
            cfg = TrainConfig(
                steps=1, batch_size=p.batch_size, seq_len=p.seq_len, bf16=prec == "bf16"
            )
            anchor = new_anchor(olmo2_config(args.preset, args.vocab, 0, 1), seed=0)
            masks = None
            if kind == "dense":
                model = anchor
                n_params = sum(x.numel() for x in model.parameters())
            if kind == "expert":
                L, H = p.num_hidden_layers, p.hidden_size
                extras = {"public.domain": torch.randn(L, H) * 0.02}
                model = build_two_expert(anchor, extras, torch.randn(L, H) * 0.02, "domain")
                fmasks = freeze_for_expert(model)
                named = dict(model.named_parameters())
                masks = [(named[k], m) for k, m in fmasks.items()]
                n_params = sum(x.numel() for x in anchor.parameters())  # per-token: both FFNs
            model.to(dev)
            masks = [(pp, m.to(dev)) for pp, m in masks or []]
            tps = bench(model, stream, cfg, args.steps, args.warmup, masks, dev)
            results[name] = tps
            line = f"{name:12s} {tps:10,.0f} tokens/s"
            if dev == "cuda":
                peak = 989e12 if "H100" in torch.cuda.get_device_name() else 989e12
                line += f"   MFU {6 * n_params * tps / peak:.1%} (6·N·tokens/s over bf16 peak)"
            print(line, flush=True)
            del model
        if "dense-fp32" in results and "expert-fp32" in results:
            print(f"expert/dense (fp32): {results['expert-fp32'] / results['dense-fp32']:.2f}")


if __name__ == "__main__":
    main()
