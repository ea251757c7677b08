"""The privacy table for one data owner of a finished demo run (`make demo` or `make demo-full`).

    python scripts/privacy_table.py --run runs/demo --domain math

Models: the public anchor, the owner's 2-expert model (public + owner, the merged model with only
that expert included), the merged model, the merged model with the owner excluded, the owner's
dense expert, the merged model with the owner's expert trained by DP-SGD at ε = 8 and ε = 1, and
an overfit positive control (the anchor trained densely for 1000 steps on 50 of the owner's
documents). Columns: what the row is audited on (what its model was trained on: the expert's and
the dense expert's training windows, DP-SGD's document prefixes, the control's documents),
extraction (the paper's protocol, 95% Wilson CI), MIA ROC AUC (loss and loss/anchor reference
attacks, 95% bootstrap CI), and in-domain held-out BPB. Writes RUN/privacy/privacy.json,
privacy.md and privacy_utility.png (BPB vs ε). DP experts and the control are trained once and
reused, and each row's audit is kept in RUN/privacy/rows/ (reused while its model and the audit
settings are unchanged), so an interrupted run resumes. Audits and BPB run under bf16 autocast
(as the demo's evaluation) unless --fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from pathlib import Path

from flexmoe.store.merged import experts_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--domain", default="math")
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--eps", type=float, nargs="+", default=[8.0, 1.0])
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument(
        "--dp-lr", type=float, help="DP experts' learning rate (default: the run's expert's)"
    )
    ap.add_argument("--control-steps", type=int, default=1000)
    ap.add_argument("--control-lr", type=float, default=3e-3)
    ap.add_argument("--fp32", action="store_true", help="audit in float32 (default bf16 autocast)")
    args = ap.parse_args()

    import numpy as np

    from flexmoe.data.shards import TokenStream
    from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
    from flexmoe.evaluation.audit import (
        MIN_DOC,
        Audited,
        audit,
        random_windows,
        split_documents,
        train_control,
        training_windows,
    )
    from flexmoe.inference.bpb import evaluate_bpb
    from flexmoe.inference.preselect import preselect_hook
    from flexmoe.lifecycle.expert import train_expert
    from flexmoe.lifecycle.merge import merge
    from flexmoe.selection import expert_mask
    from flexmoe.store.merged import load_model

    run, d = args.run, args.domain
    out = run / "privacy"
    out.mkdir(exist_ok=True)
    anchor_dir = run / "anchor"
    train, held = run / "tokens" / d / "train", run / "tokens" / d / "heldout"
    tok = load_tokenizer(anchor_dir)
    t0 = time.perf_counter()

    # DP experts (the paper's recipe under DP-SGD), merged with the other owners' experts
    others = [p for p in sorted((run / "experts").iterdir()) if p.is_dir() and p.name != d]
    others = [p for p in others if not p.name.endswith(".train")]
    own = json.loads((run / "experts" / d / "manifest.json").read_text())["training"]
    dp_lr = args.dp_lr or own["hyperparameters"]["lr"]
    dp_models = {}
    for eps in args.eps:
        pkg, merged = out / f"dp-eps{eps:g}", out / f"merged-dp-eps{eps:g}"
        if not (pkg / "manifest.json").is_file():
            train_expert(
                anchor_dir,
                train,
                pkg,
                d,
                heldout=held,
                router_docs=200,
                batch_size=64,
                seq_len=128,
                lr=dp_lr,
                restart=True,
                overwrite=True,
                dp={"epsilon": eps, "max_grad_norm": 1.0, "epochs": 1},
            )
        if not (merged / "flexmoe_merged.json").is_file():
            merge(anchor_dir, [*others, pkg], merged, log=None, overwrite=True)
        dp_models[eps] = merged
    control_dir, control_docs = train_control(
        anchor_dir, train, out / "control", steps=args.control_steps, lr=args.control_lr
    )
    print(f"models ready in {time.perf_counter() - t0:.0f} s", flush=True)

    # members: what each model was trained on (evaluation/audit.py); non-members drawn alike
    train_stream, held_stream = TokenStream(train), TokenStream(held)
    dense_cfg = json.loads((run / "dense" / d / "flexmoe_anchor.json").read_text())["training"]
    windows = {
        "expert": training_windows(train_stream, own["hyperparameters"]),
        "dense": training_windows(train_stream, dense_cfg["config"]),
    }
    win_len = len(windows["expert"][0])
    non_windows = random_windows(held_stream, args.docs, win_len, seed=0)
    first = 129  # DP-SGD's privacy unit: a document's first 129 tokens (dp.py, seq_len 128)
    dp_docs = [x[:first] for x in split_documents(train_stream) if len(x) >= MIN_DOC]
    non_docs = [x[:first] for x in split_documents(held_stream) if len(x) >= MIN_DOC]
    member_sets = {
        k: (w, non_windows, f"{len(w)} training windows of {win_len} tokens")
        for k, w in windows.items()
    }
    member_sets["dp"] = (dp_docs, non_docs, f"documents' first {first} tokens (DP-SGD's unit)")
    # the control's members are whole documents: its non-members too (extraction reads from a
    # random offset, and a document's opening is not as predictable as its body)
    whole_non_docs = [x for x in split_documents(held_stream) if len(x) >= MIN_DOC]
    member_sets["control"] = (control_docs, whole_non_docs, f"its {len(control_docs)} documents")
    same = len(windows["expert"]) == len(windows["dense"]) and all(
        np.array_equal(a, b) for a, b in zip(windows["expert"], windows["dense"], strict=True)
    )
    print(f"expert and dense expert read the same windows: {same}", flush=True)

    merged = load_model(run / "merged")
    rows = {
        "public anchor": (Audited("public anchor", load_model(anchor_dir)), "expert"),
        f"2-expert (public+{d})": (
            Audited("2-expert", merged, expert_mask(merged, include=[d])),
            "expert",
        ),
        "merged": (Audited("merged", merged), "expert"),
        f"merged, {d} excluded": (
            Audited("excluded", merged, expert_mask(merged, exclude=[d])),
            "expert",
        ),
        f"dense expert ({d})": (Audited("dense", load_model(run / "dense" / d)), "dense"),
    }
    for eps, path in dp_models.items():
        rows[f"merged, DP ε={eps:g}"] = (Audited(f"dp{eps}", load_model(path)), "dp")
    ref = rows["public anchor"][0]
    tb = token_byte_lengths(tok)
    stream = held_stream
    import torch

    def numerics():
        if args.fp32:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16)

    settings = {
        "docs": args.docs,
        "eval_tokens": args.eval_tokens,
        "fp32": args.fp32,
        "members": "trained-on",  # v2: each row audited on what it was trained on
        "extraction": "members and non-members",  # v3: the extraction rate on unseen text too
    }
    paths = {
        "public anchor": anchor_dir,
        f"dense expert ({d})": run / "dense" / d,
        **{f"merged, DP ε={e:g}": p for e, p in dp_models.items()},
    }

    def stamp(path: Path) -> str:
        """Identity of a model directory's weights: their names, sizes and mtimes."""
        files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".json"))
        st = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return hashlib.sha256(json.dumps(st).encode()).hexdigest()[:16]

    def cached(label: str, path: Path, compute, **extra) -> dict:
        """The row's audit, from RUN/privacy/rows/ when its model and settings are unchanged."""
        key = settings | extra | {"model": stamp(path)}
        f = out / "rows" / (hashlib.sha256(label.encode()).hexdigest()[:12] + ".json")
        if f.is_file() and (old := json.loads(f.read_text()))["key"] == key:
            return old["row"]
        r = compute()
        f.parent.mkdir(exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps({"label": label, "key": key, "row": r}, default=str))
        tmp.replace(f)
        return r

    def row(label: str, a, kind: str) -> dict:
        mem, non, what = member_sets[kind]
        r = audit([a], tok, mem, non, ref, n_docs=args.docs, seq_len=128)[a.label]
        r["members"] = what
        pre = experts_of(a.model).preselect
        with a.ctx():
            r["bpb"] = evaluate_bpb(
                lambda ids, m=a.model: m(ids).logits,
                stream,
                tb,
                256,
                max_tokens=args.eval_tokens,
                before_batch=preselect_hook(a.model, tok, stream, pre) if pre else None,
            )["bpb"]
        return r

    results = {}
    for label, (a, kind) in rows.items():
        with torch.no_grad(), numerics():
            results[label] = cached(
                label,
                paths.get(label, run / "merged"),
                lambda label=label, a=a, kind=kind: row(label, a, kind),
            )
        r = results[label]
        print(label, json.dumps({k: v for k, v in r.items() if k != "mia"}), flush=True)

    def control_row() -> dict:
        ctrl = Audited("control", load_model(control_dir))
        mem, non, what = member_sets["control"]
        r = audit([ctrl], tok, mem, non, ref, n_docs=args.docs, seq_len=128)["control"]
        r["members"] = what
        r["bpb"] = evaluate_bpb(
            lambda ids: ctrl.model(ids).logits, stream, tb, 256, max_tokens=args.eval_tokens
        )["bpb"]
        return r

    with torch.no_grad(), numerics():
        results["overfit control (50 docs)"] = cached(
            "control", control_dir, control_row, non_members="whole held-out documents"
        )
    for eps in args.eps:
        results[f"merged, DP ε={eps:g}"]["dp"] = json.loads(
            (out / f"dp-eps{eps:g}" / "manifest.json").read_text()
        )["training"]["dp"]

    lines = [
        f"# Privacy table: the {d} owner ({run})",
        "",
        f"DP experts: the paper's recipe under DP-SGD (Opacus, Poisson sampling, ghost clipping), "
        f"1 epoch over the owner's documents (first 129 tokens each), expected batch 64, lr "
        f"{dp_lr:g}, clip 1.0. Overfit control: the anchor trained densely for "
        f"{args.control_steps} steps (batch 8, lr {args.control_lr:g}) on 50 of the owner's "
        f"documents. Each row is audited on what its model was trained on (members column; at "
        f"most {args.docs}) against as many non-members drawn the same way from held-out {d} "
        "text (windows at random offsets, documents' first tokens, or whole documents for "
        "the control), so a model that saw neither scores AUC ≈ 0.5, and the same "
        "extraction test on the non-members gives the "
        "rate a model reaches on text it never saw (memorisation is the excess over it); the "
        "2-expert, merged and excluded rows and the anchor (the reference attack's "
        "reference, so its reference AUC is 0.5 by construction) use the expert's windows. "
        f"BPB on the first {args.eval_tokens:,} held-out {d} tokens; "
        f"{'float32' if args.fp32 else 'bf16 autocast'} for every model. Intervals: 95% "
        "(Wilson for extraction, bootstrap for AUC).",
        "",
        f"| model ({d} owner) | members | extraction (95% CI) | extraction, non-members | "
        f"MIA AUC loss | MIA AUC ref | {d} BPB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def extracted(e: dict) -> str:
        if e["documents"] == 0:  # no text of ≥ MIN_DOC tokens: no extraction test
            return "-"
        return (
            f"{e['extracted']}/{e['documents']} "
            f"({100 * e['ci95'][0]:.1f}–{100 * e['ci95'][1]:.1f}%)"
        )

    def auc(a: dict) -> str:
        return f"{a['auc']:.3f} ({a['ci95'][0]:.2f}–{a['ci95'][1]:.2f})"

    for label, r in results.items():
        mia = r["mia"]
        lines.append(
            f"| {label} | {r['members']} | {extracted(r['extraction'])} | "
            f"{extracted(r['extraction_non_members'])} | {auc(mia['loss'])} | "
            f"{auc(mia['reference'])} | {r['bpb']:.3f} |"
        )
    (out / "privacy.md").write_text("\n".join(lines) + "\n")
    (out / "privacy.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    eps = sorted(args.eps)
    ax.plot(eps, [results[f"merged, DP ε={e:g}"]["bpb"] for e in eps], "o-", label="merged, DP")
    for label, style in (("merged", "--"), ("public anchor", ":")):
        ax.axhline(results[label]["bpb"], ls=style, color="gray", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("ε (per document, δ recorded in the manifest)")
    ax.set_ylabel(f"{d} held-out BPB (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "privacy_utility.png", dpi=120)
    print(f"→ {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
