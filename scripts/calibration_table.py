"""Gate calibration on a finished demo run: none vs calibrated variants (issue 23).

    python scripts/calibration_table.py --run runs/demo --out results/calibration/demo-smollm2
    python scripts/calibration_table.py --run runs/demo --variants none,lm:0,lm:1 --out DIR
    python scripts/calibration_table.py --run runs/demo --out DIR \
        --variants none,train:bias=clamp+bias_init=0+train_bias=false+router_lr_scale=10

Each owner's package in RUN/experts is calibrated once per variant (`expert calibrate`):
  owner    classifier, --owner-target owner (the owner's tokens pushed to its expert),
  trained  classifier, --owner-target trained (their routing kept; only public text re-routed),
  lm:W     --method lm: all owner rows fitted with the LM loss in the loop, public-gate weight W;
  train:K=V+K=V  each owner's expert retrained with the run's settings and seed and these recipe
           settings changed (`train_bias=false` freezes the router bias at bias_init), no
           calibration: how the training recipe itself moves routing and BPB;
the classifier variants use --public-weight (4, the flexmoe recipe's). Where the
run's packages were calibrated during training (the scratch demo: post-norm blocks), uncalibrated
copies are trained first with the same recipe, settings and seed, and all three rows start from
them. The three sets are
merged like the run's merged model (same top-k and preselection) and scored on the run's held-out
windows (bf16 autocast, the model's default mode): the merged model, each owner's 2-expert model
on its own domain and on public text, and the routing weight each domain's text gives its own
expert. Writes calibration.md / calibration.json with 95% intervals (paired, over windows).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def train_overrides(v: str) -> dict:
    """`train:K=V+K=V` → {K: V} with numbers and true/false parsed."""
    out: dict = {}
    for kv in v[len("train:") :].split("+"):
        k, sep, val = kv.partition("=")
        if not sep or not k:
            raise SystemExit(f"variant {v!r}: expected train:KEY=VALUE+KEY=VALUE")
        low = val.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
        else:
            try:
                out[k] = float(val)
            except ValueError:
                out[k] = val
    return out


def variant_recipe(v: str, public_weight: float, steps: int, lr: float) -> dict:
    """make_recipe("flexmoe", **this) for a variant name (see the module doc)."""
    if v.startswith("train:"):
        o = train_overrides(v)
        o.pop("train_bias", None)
        return {**o, "calibrate": False}
    if v in ("owner", "trained"):
        return {"calibrate_owner_target": v, "calibrate_public_weight": public_weight}
    if v.startswith("lm:"):
        return {
            "calibrate_method": "lm",
            "calibrate_public_weight": float(v[3:]),
            "calibrate_steps": steps,
            "calibrate_lr": lr,
        }
    raise SystemExit(f"unknown variant {v!r} (none, owner, trained, lm:W, train:K=V+...)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens per domain")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--public-weight", type=float, default=4.0, help="classifier variants")
    ap.add_argument("--variants", default="none,owner,trained")
    ap.add_argument("--lm-steps", type=int, default=60)
    ap.add_argument("--lm-lr", type=float, default=1e-3)
    args = ap.parse_args()
    variants = args.variants.split(",")
    if variants[0] != "none":
        raise SystemExit("--variants must start with none (the rows are compared with it)")
    for v in variants[1:]:
        variant_recipe(v, args.public_weight, args.lm_steps, args.lm_lr)

    import numpy as np
    import torch

    from flexmoe.data.shards import TokenStream
    from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
    from flexmoe.evaluation import intervals as iv
    from flexmoe.evaluation.demo_eval import EvalSettings, routing_diagonal, routing_matrix
    from flexmoe.inference.bpb import evaluate_bpb
    from flexmoe.inference.preselect import preselect_hook
    from flexmoe.lifecycle.expert import calibrate_package, make_recipe, train_expert
    from flexmoe.lifecycle.merge import merge
    from flexmoe.model.router import routing
    from flexmoe.selection import expert_mask, expert_names
    from flexmoe.store.merged import experts_of, load_model, read_merged_meta
    from flexmoe.store.package import read_manifest

    t0 = time.perf_counter()
    run, work = args.run, args.run / "calibration"
    anchor = run / "anchor"
    pkgs = {
        p.name: p
        for p in sorted((run / "experts").iterdir())
        if p.is_dir() and not p.name.endswith(".train")
    }
    domains = list(pkgs)

    def retrain(pkg: Path, d: str, dst: Path, over: dict) -> None:
        """Train owner d's expert again with the package's settings and seed, the recipe
        changed by `over` (train_bias included), uncalibrated."""
        tr = read_manifest(pkg).training.model_dump()
        hp = tr["hyperparameters"]
        rec = {k: v for k, v in tr["recipe"].items() if not k.endswith("_objective")}
        over = dict(over)
        train_bias = over.pop("train_bias", tr["train_bias"])
        train_expert(
            anchor, run / "tokens" / d / "train", dst, d,
            heldout=run / "tokens" / d / "heldout", domain=d,
            router_docs=tr["router_docs"], train_bias=train_bias,
            recipe=make_recipe(**{**rec, **over, "calibrate": False}),
            public=run / "tokens" / "public" / "train", overwrite=True, restart=True,
            **{k: hp[k] for k in ("steps", "warmup", "bf16", "batch_size", "seq_len",
                                  "seed", "lr", "eval_tokens")},
        )  # fmt: skip

    calibrated = {
        d: read_manifest(p).training.model_dump().get("gate_calibration") is not None
        for d, p in pkgs.items()
    }
    meta = read_merged_meta(run / "merged")
    merged_dirs = {"none": run / "merged"}
    if any(calibrated.values()):
        # the run's packages were calibrated at the end of training: train uncalibrated copies
        # with the same recipe, settings and seed (calibration is a separate last step, so the
        # copies are what training had before it), and build all three rows from them
        print(f"{run}: packages calibrated during training; training uncalibrated copies")
        copies = {}
        for d, p in pkgs.items():
            dst = work / "uncalibrated" / d
            if not (dst / "manifest.json").is_file():
                retrain(p, d, dst, {})
            copies[d] = dst
        pkgs = copies
        merged_dirs["none"] = work / "merged-none"
        if not (merged_dirs["none"] / "flexmoe_merged.json").is_file():
            merge(
                anchor, list(pkgs.values()), merged_dirs["none"], top_k=meta["top_k"],
                preselect=meta["preselect"], log=None, overwrite=True,
            )  # fmt: skip
    sets = {"none": pkgs}
    for target in variants[1:]:
        sets[target] = {}
        for d, p in pkgs.items():
            dst = work / target.replace(":", "-").replace("=", "").replace("+", "_") / d
            if target.startswith("train:") and not (dst / "manifest.json").is_file():
                retrain(p, d, dst, train_overrides(target))
                print(f"{target} {d} trained {time.perf_counter() - t0:.0f} s", flush=True)
            elif not (dst / "manifest.json").is_file():
                rec = make_recipe(
                    "flexmoe",
                    calibrate=True,
                    **variant_recipe(target, args.public_weight, args.lm_steps, args.lm_lr),
                )
                calibrate_package(
                    anchor, p, run / "tokens" / d / "train", run / "tokens" / "public" / "train",
                    dst, rec, seq_len=args.seq_len, seed=0, overwrite=True,
                )  # fmt: skip
            sets[target][d] = dst
    for target in variants[1:]:
        tag = target.replace(":", "-").replace("=", "").replace("+", "_")
        dst = work / f"merged-{tag}"
        if not (dst / "flexmoe_merged.json").is_file():
            merge(
                anchor, list(sets[target].values()), dst, top_k=meta["top_k"],
                preselect=meta["preselect"], log=None, overwrite=True,
            )  # fmt: skip
        merged_dirs[target] = dst
    t_build = time.perf_counter() - t0

    tok = load_tokenizer(anchor)
    tb = token_byte_lengths(tok)
    all_domains = ["public", *domains]
    streams = {d: TokenStream(run / "tokens" / d / "heldout") for d in all_domains}
    settings = EvalSettings(
        domains=tuple(domains), seq_len=args.seq_len, eval_tokens=args.tokens,
        baselines=False, prompt="",
    )  # fmt: skip
    windows: dict[str, dict[str, dict]] = {}
    own_weight: dict[str, dict[str, float]] = {}
    for v, path in merged_dirs.items():
        model = load_model(path)
        pre = experts_of(model).preselect

        def before(s, model=model, pre=pre):
            return preselect_hook(model, tok, s, pre) if pre else None

        def score(d, model=model, before=before, hook=True):
            return evaluate_bpb(
                lambda ids: model(ids).logits, streams[d], tb, args.seq_len,
                max_tokens=args.tokens, before_batch=before(streams[d]) if hook else None,
            )["windows"]  # fmt: skip

        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            windows[f"merged ({v})"] = {d: score(d) for d in all_domains}
            two = windows.setdefault(f"2-expert ({v})", {})
            for d in domains:  # the owner's 2-expert model: public + d (nothing to preselect)
                with routing(model, mask=expert_mask(model, include=[d])):
                    two[d], two[f"public|{d}"] = score(d, hook=False), score("public", hook=False)
            shares = routing_matrix(model, streams, settings, before if pre else None)
        own_weight[v] = routing_diagonal(shares, expert_names(model))
        own_weight[v]["public"] = float(np.mean(shares["public"], axis=0)[0])
        print(v, "done", f"{time.perf_counter() - t0:.0f} s", flush=True)

    def cell(w) -> str:
        lo, hi = iv.bpb_ci(w)
        return f"{iv.bpb_of(w):.3f} [{lo:.3f}, {hi:.3f}]"

    def delta(a, b) -> str:
        c = iv.paired_diff(a, b)
        return f"{100 * c['rel']:+.1f}% [{100 * c['rel_lo']:+.1f}%, {100 * c['rel_hi']:+.1f}%]"

    md = [
        f"# Gate calibration and training variants: {' vs '.join(variants)} ({run})",
        "",
        f"Classifier variants (owner, trained): public weight {args.public_weight:g}. lm:W: "
        f"`expert calibrate --method lm --public-weight W --steps {args.lm_steps} --lr "
        f"{args.lm_lr:g}`. Merges follow the family's router-bias rule (model/arch.py). "
        "Held-out BPB (lower is better) on the first "
        f"{args.tokens:,} tokens per domain in {args.seq_len}-token windows, bf16 autocast, "
        "each merged model in its default mode (stored preselection); 95% bootstrap intervals "
        "over windows, differences paired. Build (calibration + merges) "
        f"{t_build:.0f} s.",
        "",
        "## Merged model",
        "",
        "| calibration | " + " | ".join([*all_domains, "mean"]) + " |",
        "|---|" + "---:|" * (len(all_domains) + 1),
    ]
    res: dict = {"windows_bpb": {}, "diffs": {}, "own_weight": own_weight}
    for v in variants:
        w = windows[f"merged ({v})"]
        mean = sum(iv.bpb_of(w[d]) for d in all_domains) / len(all_domains)
        lo, hi = iv.mean_ci(w)
        md.append(
            f"| {v} | " + " | ".join(cell(w[d]) for d in all_domains) + f" | {mean:.3f} "
            f"[{lo:.3f}, {hi:.3f}] |"
        )
        res["windows_bpb"][f"merged ({v})"] = {d: iv.bpb_of(w[d]) for d in all_domains}
    for v in variants[1:]:
        a, b = windows[f"merged ({v})"], windows["merged (none)"]
        m = iv.paired_mean_diff(a, b)
        md.append(
            f"| Δ {v} − none | " + " | ".join(delta(a[d], b[d]) for d in all_domains) + " | "
            f"{100 * m['rel']:+.1f}% [{100 * m['rel_lo']:+.1f}%, {100 * m['rel_hi']:+.1f}%] |"
        )
        res["diffs"][f"merged {v} − none"] = {"mean": m} | {
            d: iv.paired_diff(a[d], b[d]) for d in all_domains
        }
    md += [
        "",
        "## Each owner's 2-expert model (public + owner)",
        "",
        "| calibration | " + " | ".join(f"{d} on {d} | {d} on public" for d in domains) + " |",
        "|---|" + "---:|" * (2 * len(domains)),
    ]
    for v in variants:
        w = windows[f"2-expert ({v})"]
        md.append(
            f"| {v} | " + " | ".join(f"{cell(w[d])} | {cell(w[f'public|{d}'])}" for d in domains)
            + " |"
        )  # fmt: skip
        res["windows_bpb"][f"2-expert ({v})"] = {k: iv.bpb_of(x) for k, x in w.items()}
    for v in variants[1:]:
        a, b = windows[f"2-expert ({v})"], windows["2-expert (none)"]
        md.append(
            f"| Δ {v} − none | "
            + " | ".join(f"{delta(a[d], b[d])} | {delta(a[f'public|{d}'], b[f'public|{d}'])}"
                         for d in domains)
            + " |"
        )  # fmt: skip
    md += [
        "",
        "## Routing weight on the text's own expert (merged model, default mode)",
        "",
        "| calibration | " + " | ".join(all_domains) + " |",
        "|---|" + "---:|" * len(all_domains),
    ]
    for v in variants:
        md.append(f"| {v} | " + " | ".join(f"{own_weight[v][d]:.2f}" for d in all_domains) + " |")
    md += ["", f"Total {time.perf_counter() - t0:.0f} s."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.md").write_text("\n".join(md) + "\n")
    (args.out / "calibration.json").write_text(json.dumps(res, indent=1, default=float))
    print("\n".join(md))


if __name__ == "__main__":
    main()
