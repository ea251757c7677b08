"""GPU smoke test: the lifecycle on a CUDA device, with the guarantees checked there.

    bash scripts/gpu_smoke.sh                 # skips cleanly (exit 0) without a CUDA GPU
    python scripts/gpu_smoke.py --device cpu  # the same checks on CPU (to test the script)

Tokenizer → anchor (a few steps) → one expert (a few steps) → merge → eval bpb → generate, all
on the device, checking: the expert's frozen tensors and public slices are bit-identical after
training on the device, and opting an expert out equals merging without it on the device's
default experts implementation (grouped_mm on CUDA), including rows with fewer active experts
than top-k. Prints one line per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    from flexmoe.data.corpus import DEFAULT_ROOT, iter_docs
    from flexmoe.data.shards import TokenStream, tokenize_to_shards
    from flexmoe.data.tokenizer import load_tokenizer, train_tokenizer
    from flexmoe.evaluation.heldout import bpb_table
    from flexmoe.inference.generate import generate
    from flexmoe.lifecycle.anchor import train_anchor
    from flexmoe.lifecycle.expert import (
        build_two_expert,
        freeze_for_expert,
        project_bias,
        train_expert,
    )
    from flexmoe.lifecycle.merge import build_merged, merge
    from flexmoe.model.device import experts_impl_for, place, resolve_device
    from flexmoe.model.freezing import merge_owner_params
    from flexmoe.model.router import routing
    from flexmoe.selection import expert_mask
    from flexmoe.store.anchor_dir import load_anchor
    from flexmoe.store.merged import load_merged
    from flexmoe.store.package import verify_package
    from flexmoe.train.loop import TrainConfig, train

    dev = resolve_device(args.device)
    t0 = time.perf_counter()
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'})")
    root = Path(tempfile.mkdtemp(prefix="flexmoe-gpu-smoke-"))

    def texts(domain: str, split: str, n: int) -> list[str]:
        return [
            d["text"][:4000] for d in itertools.islice(iter_docs(DEFAULT_ROOT, domain, split), n)
        ]

    tok_dir = train_tokenizer(texts("public", "train", 300), root / "tok", 512)
    shards = {}
    for domain, split, n in [("public", "train", 150), ("public", "heldout", 20)]:
        src = root / "raw" / f"{domain}-{split}.jsonl"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(domain, split, n)))
        shards[(domain, split)] = tokenize_to_shards(
            [src], root / "tok-data" / domain / split, tok_dir
        )
    for domain, split, n in [("code", "train", 80), ("code", "heldout", 10), ("math", "train", 80)]:
        src = root / "raw" / f"{domain}-{split}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(domain, split, n)))
        tokenize_to_shards([src], root / "tok-data" / domain / split, tok_dir)
    data = root / "tok-data"
    kw = dict(steps=args.steps, device=str(dev))
    train_anchor(
        data / "public/train", root / "anchor", tok_dir, preset="tiny", router_docs=8, **kw
    )
    print(f"ok: anchor trained on {dev}")

    anchor, _, extras = load_anchor(root / "anchor")
    L, H = anchor.config.num_hidden_layers, anchor.config.hidden_size
    model = build_two_expert(anchor, extras, torch.randn(L, H) * 0.1, "domain")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = freeze_for_expert(model)
    cfg = TrainConfig(
        steps=args.steps, batch_size=4, seq_len=64, lr=1e-2, weight_decay=0.1, device=str(dev)
    )
    train(
        model,
        TokenStream(data / "code/train"),
        cfg,
        root / "frozen-run",
        grad_masks=masks,
        post_step=project_bias,
    )
    place(model, "cpu")
    merge_owner_params(model)
    for k, v in model.state_dict().items():
        if ".mlp.experts." in k or ".mlp.gate." in k:
            assert torch.equal(v[0], before[k][0]), f"public slice of {k} changed on {dev}"
        else:
            assert torch.equal(v, before[k]), f"frozen {k} changed on {dev}"
    print(f"ok: frozen tensors and public slices bit-identical after training on {dev}")

    pkgs = []
    for d in ("code", "math"):
        train_expert(
            root / "anchor",
            data / f"{d}/train",
            root / f"pkg-{d}",
            d,
            recipe="paper",
            router_docs=8,
            batch_size=4,
            seq_len=64,
            **kw,
        )
        pkgs.append(root / f"pkg-{d}")
    print(f"ok: 2 experts trained on {dev}")
    merge(root / "anchor", pkgs, root / "merged", log=None)
    rows, _ = bpb_table(
        root / "merged", data, max_tokens=4096, seq_len=64, unigram=False, device=str(dev)
    )
    print("ok: eval bpb on", dev, {r["domain"]: round(r["bpb"], 3) for r in rows})
    full = place(load_merged(root / "merged"), dev)
    tok = load_tokenizer(root / "merged")
    g = generate(full, tok, "def f(x):", 12, attribution=True)
    print(f"ok: generate on {dev}: {g.text[:40]!r} attribution {g.attribution}")

    model_a, record, extras = load_anchor(root / "anchor")
    verified = [verify_package(p, record, extras, model_a) for p in pkgs]
    ids = torch.randint(2, 500, (3, 48), generator=torch.Generator().manual_seed(0)).to(dev)
    worst = 0.0
    for keep in ([0], [1], []):
        small = place(build_merged(model_a, record, extras, [verified[i] for i in keep]), dev)
        with (
            torch.no_grad(),
            routing(
                full,
                mask=expert_mask(
                    full,
                    include=[verified[i][0].name for i in keep] or None,
                    exclude=None if keep else ["code", "math"],
                ),
            ),
        ):
            got = full(ids).logits
        with torch.no_grad():
            want = small(ids).logits
        worst = max(worst, (got - want).abs().max().item())
    tol = 1e-5 if dev.type == "cpu" else 1e-4
    assert worst <= tol, f"opt-out differs from merge-without by {worst:.2e} on {dev}"
    print(f"ok: exact opt-out on {dev} ({experts_impl_for(dev)}): max |Δlogits| {worst:.1e}")
    print(f"gpu smoke passed in {time.perf_counter() - t0:.0f} s ({root})")


if __name__ == "__main__":
    main()
