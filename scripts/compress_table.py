"""Low-rank expert packages on a real run: size vs quality, per rank (issue 23, FlexMoRE).

    python scripts/compress_table.py --run runs/demo --domain code --ranks 8,32,128

For the domain's expert package in RUN/experts/DOMAIN: `expert compress --rank R` for each rank,
then the owner's model (public + that expert, merged as `merge` does, top-2) scored on the
domain's held-out tokens (BPB, the first --tokens tokens), beside the full package and the anchor.
Prints a markdown table (stored FFN parameters, package MB, energy kept, BPB, the share of the
full expert's gain over the anchor that the compressed one keeps); --json writes it.

`--train-ranks 32,128` also trains the domain's expert at each rank (`expert train --rank R`,
the full package's recipe, settings, seed and data read from its manifest; `--train-lrs` to try
other learning rates; rank 0 is ordinary full-rank training, to compare learning rates on equal
terms) into RUN/lowrank/, reused when present, and scores each beside the
compressed ones: stored at its own rank (lossless), with the training seconds of each from its
manifest (the full package's too; compare them only from runs on an otherwise idle machine).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--domain", default="code")
    ap.add_argument("--ranks", default="8,32,128")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--train-ranks", default="", help="also train at these ranks")
    ap.add_argument(
        "--train-lrs",
        default="",
        help="learning rates of those, comma-separated (default: the full's)",
    )
    ap.add_argument(
        "--merged",
        action="store_true",
        help="also score the merged model of every expert in RUN/experts (this one compressed), "
        "token routing, default top-k",
    )
    args = ap.parse_args()

    import torch

    from flexmoe.data.shards import TokenStream
    from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
    from flexmoe.inference.bpb import evaluate_bpb
    from flexmoe.lifecycle.compress import compress_package
    from flexmoe.lifecycle.expert import make_recipe, train_expert
    from flexmoe.lifecycle.merge import build_merged
    from flexmoe.store.anchor_dir import load_anchor
    from flexmoe.store.package import read_manifest, verify_package

    anchor_dir, pkg = args.run / "anchor", args.run / "experts" / args.domain
    anchor, record, extras = load_anchor(anchor_dir)
    anchor = anchor.float().eval()
    tb = token_byte_lengths(load_tokenizer(anchor_dir))
    heldout = args.run / "tokens" / args.domain / "heldout"

    @torch.no_grad()
    def bpb(model) -> float:
        stream = TokenStream(heldout)
        return evaluate_bpb(
            lambda ids: model(ids).logits, stream, tb, args.seq_len, max_tokens=args.tokens
        )["bpb"]

    def owner_bpb(package: Path) -> float:
        m, t = verify_package(package, record, extras, anchor)
        return bpb(build_merged(anchor, record, extras, [(m, t)], top_k=2).float().eval())

    others = sorted(
        p for p in (args.run / "experts").iterdir() if (p / "manifest.json").is_file() and p != pkg
    )

    def merged_bpb(package: Path) -> float:
        pkgs = [verify_package(p, record, extras, anchor) for p in [*others, package]]
        return bpb(build_merged(anchor, record, extras, pkgs).float().eval())

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.iterdir() if f.name == "expert.safetensors")

    rows = [{"package": "anchor (no expert)", "bpb": bpb(anchor)}]
    full = owner_bpb(pkg)
    secs = read_manifest(pkg).training.model_dump().get("seconds")
    rows.append(
        {"package": "full", "bpb": full, "mb": size(pkg) / 1e6, "energy": 1.0, "train_s": secs}
    )
    if args.merged:
        rows[1]["merged_bpb"] = merged_bpb(pkg)
    tmp = Path(tempfile.mkdtemp(prefix="flexmoe-compress-"))
    for r in map(int, args.ranks.split(",")):
        out = tmp / f"r{r}"
        man = compress_package(pkg, anchor_dir, out, rank=r)
        c = man["compression"]
        rows.append(
            {
                "package": f"rank {r}",
                "bpb": owner_bpb(out),
                "mb": size(out) / 1e6,
                "energy": c["energy"],
                "ffn_params": c["parameters_stored"],
                "ffn_params_full": c["parameters_full"],
            }
        )
        if args.merged:
            rows[-1]["merged_bpb"] = merged_bpb(out)
    trained = []
    ft = read_manifest(pkg).training.model_dump()
    lrs = [float(x) for x in args.train_lrs.split(",") if x] or [None]
    for r, lr in [(int(x), lr) for x in args.train_ranks.split(",") if x for lr in lrs]:
        hp = ft["hyperparameters"]
        name = f"{args.domain}-r{r}" + (f"-lr{lr:g}" if lr else "")
        t = args.run / "lowrank" / name
        if not (t / "manifest.json").is_file():
            rec = {k: v for k, v in ft["recipe"].items() if not k.endswith("_objective")}
            tokens = args.run / "tokens"
            train_expert(
                anchor_dir, tokens / args.domain / "train", t, args.domain,
                heldout=heldout, domain=args.domain, router_docs=ft["router_docs"],
                train_bias=ft["train_bias"], recipe=make_recipe(**rec),
                public=tokens / "public" / "train", rank=r or None, restart=True, overwrite=True,
                lr=lr or hp["lr"], **{k: hp[k] for k in ("steps", "warmup", "bf16", "batch_size",
                                                         "seq_len", "seed", "eval_tokens")},
            )  # fmt: skip
        trained.append(t)
    for t in trained:
        tr = read_manifest(t).training.model_dump()
        lr = tr["hyperparameters"]["lr"]
        if tr.get("low_rank") is None:  # rank 0: full-rank training at another lr
            full_rank = {"energy": 1.0, "ffn_params": 1, "ffn_params_full": 1, "mb": size(t) / 1e6}
            rows.append({"package": f"trained at full rank, lr {lr:g}", "bpb": owner_bpb(t)})
            rows[-1] |= full_rank | {"train_s": tr.get("seconds")}
        else:
            r = tr["low_rank"]["rank"]
            out = tmp / f"{t.name}-r{r}"
            c = compress_package(t, anchor_dir, out, rank=r)["compression"]
            rows.append(
                {
                    "package": f"trained at rank {r}, lr {lr:g}",
                    "bpb": owner_bpb(t),
                    "mb": size(out) / 1e6,
                    "energy": c["energy"],
                    "ffn_params": c["parameters_stored"],
                    "ffn_params_full": c["parameters_full"],
                    "train_s": tr.get("seconds"),
                }
            )
        if args.merged:
            rows[-1]["merged_bpb"] = merged_bpb(t)
    print(f"{args.run}, expert '{args.domain}', held-out {args.tokens} tokens, owner's model\n")
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def render(rows: list[dict]) -> str:
    """The markdown table; fills each row's "gain_kept" (the share of the full expert's gain
    over the anchor that it keeps). Rows: the anchor first, then the full package."""
    base, full = rows[0]["bpb"], rows[1]["bpb"]
    merged = any("merged_bpb" in r for r in rows)
    timed = any(r.get("train_s") for r in rows[2:])
    lines = [
        "| package | FFN params stored | package MB | energy kept | BPB | gain kept |"
        + (" merged BPB | merged gain kept |" if merged else "")
        + (" training s |" if timed else ""),
        "|---|---:|---:|---:|---:|---:|"
        + ("---:|---:|" if merged else "")
        + ("---:|" if timed else ""),
    ]
    for row in rows:
        row["gain_kept"] = (base - row["bpb"]) / (base - full) if base != full else float("nan")
        share = row["ffn_params"] / row["ffn_params_full"] if "ffn_params" in row else None
        share = 1.0 if row["package"] == "full" else share
        cells = [
            row["package"],
            "–" if share is None else f"{share:.1%}",
            f"{row['mb']:.1f}" if "mb" in row else "–",
            f"{row['energy']:.3f}" if "energy" in row else "–",
            f"{row['bpb']:.4f}",
            f"{row['gain_kept']:.0%}",
        ]
        if merged:
            m = row.get("merged_bpb")
            full_m = rows[1].get("merged_bpb")
            row["merged_gain_kept"] = (base - m) / (base - full_m) if m and full_m else None
            cells += [
                "–" if m is None else f"{m:.4f}",
                "–" if row["merged_gain_kept"] is None else f"{row['merged_gain_kept']:.0%}",
            ]
        if timed:
            cells.append(f"{row['train_s']:.0f}" if row.get("train_s") else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
