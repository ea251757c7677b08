"""The privacy table for one data owner of a finished demo run (`make demo` or `make demo-full`).

    python scripts/privacy_table.py --run runs/demo --domain math

Models: the public anchor, the owner's 2-expert model (public + owner, the merged model with only
that expert included), the merged model, the merged model with the owner excluded, the owner's
dense expert, the merged model with the owner's expert trained by DP-SGD at ε = 8 and ε = 1, and
an overfit positive control (the anchor trained densely for 1000 steps on 50 of the owner's
documents). Columns: extraction % (the paper's protocol, 95% Wilson CI), MIA ROC AUC (loss and
loss/anchor reference attacks), and in-domain held-out BPB. Writes RUN/privacy/privacy.json,
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

    from flexmoe.data.shards import TokenStream
    from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
    from flexmoe.evaluation.audit import Audited, audit, split_documents, train_control
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

    merged = load_model(run / "merged")
    rows = {
        "public anchor": Audited("public anchor", load_model(anchor_dir)),
        f"2-expert (public+{d})": Audited("2-expert", merged, expert_mask(merged, include=[d])),
        "merged": Audited("merged", merged),
        f"merged, {d} excluded": Audited("excluded", merged, expert_mask(merged, exclude=[d])),
        f"dense expert ({d})": Audited("dense", load_model(run / "dense" / d)),
    }
    for eps, path in dp_models.items():
        rows[f"merged, DP ε={eps:g}"] = Audited(f"dp{eps}", load_model(path))
    members = split_documents(TokenStream(train))
    non = split_documents(TokenStream(held))
    ref = rows["public anchor"]
    tb = token_byte_lengths(tok)
    stream = TokenStream(held)
    import torch

    def numerics():
        if args.fp32:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16)

    settings = {"docs": args.docs, "eval_tokens": args.eval_tokens, "fp32": args.fp32}
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

    def cached(label: str, path: Path, compute) -> dict:
        """The row's audit, from RUN/privacy/rows/ when its model and settings are unchanged."""
        key = settings | {"model": stamp(path)}
        f = out / "rows" / (hashlib.sha256(label.encode()).hexdigest()[:12] + ".json")
        if f.is_file() and (old := json.loads(f.read_text()))["key"] == key:
            return old["row"]
        r = compute()
        f.parent.mkdir(exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps({"label": label, "key": key, "row": r}, default=str))
        tmp.replace(f)
        return r

    def row(label: str, a) -> dict:
        r = audit([a], tok, members, non, ref, n_docs=args.docs, seq_len=128)[a.label]
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
    for label, a in rows.items():
        with torch.no_grad(), numerics():
            results[label] = cached(
                label, paths.get(label, run / "merged"), lambda label=label, a=a: row(label, a)
            )
        r = results[label]
        print(label, json.dumps({k: v for k, v in r.items() if k != "mia"}), flush=True)

    def control_row() -> dict:
        ctrl = Audited("control", load_model(control_dir))
        r = audit([ctrl], tok, control_docs, non, ref, n_docs=args.docs, seq_len=128)["control"]
        r["bpb"] = evaluate_bpb(
            lambda ids: ctrl.model(ids).logits, stream, tb, 256, max_tokens=args.eval_tokens
        )["bpb"]
        return r

    with torch.no_grad(), numerics():
        results["overfit control (50 docs)"] = cached("control", control_dir, control_row)
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
        f"documents. Audit on {args.docs} member / non-member documents; BPB on the first "
        f"{args.eval_tokens:,} held-out {d} tokens; "
        f"{'float32' if args.fp32 else 'bf16 autocast'} for every model.",
        "",
        f"| model ({d} owner) | extraction % (95% CI) | MIA AUC loss | MIA AUC ref | {d} BPB |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        e, mia = r["extraction"], r["mia"]
        lines.append(
            f"| {label} | {100 * e['rate']:.1f} ({100 * e['ci95'][0]:.1f}–"
            f"{100 * e['ci95'][1]:.1f}) | {mia['loss']['auc']:.3f} | "
            f"{mia['reference']['auc']:.3f} | {r['bpb']:.3f} |"
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
