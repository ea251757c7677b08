"""Evaluation of a demo run and its report: main table, opt-out matrix, routing matrix, top-k
curve, no-bias ablation, router-embedding similarity, a generation with attribution.

Everything here is measured on held-out splits the models never trained on; nothing is tuned
on them. `flexmoe report RUN_DIR` rebuilds report.md and the plots from results.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from flexmoe.data.corpus import PUBLIC
from flexmoe.store.fsutil import atomic_file, write_json
from flexmoe.store.merged import experts_of

console = Console(stderr=True)


def _bpb(model_fn, streams, tb, cfg, before=None, only=None) -> dict[str, float]:
    """Per-domain BPB plus the mean and closed mean; before(stream) → a before_batch hook.
    `only`: evaluate these domains, NaN for the rest (lean evaluation)."""
    from flexmoe.inference.bpb import evaluate_bpb

    res = {
        d: evaluate_bpb(
            model_fn,
            s,
            tb,
            cfg.seq_len,
            max_tokens=cfg.eval_tokens,
            before_batch=before(s) if before else None,
        )["bpb"]
        if only is None or d in only
        else float("nan")
        for d, s in streams.items()
    }
    closed = [v for d, v in res.items() if d != PUBLIC]
    res["mean"] = sum(res[d] for d in streams) / len(streams)
    res["closed mean"] = sum(closed) / max(len(closed), 1)
    return res


@torch.no_grad()
def evaluate_all(
    cfg,
    paths: dict[str, Path],
    recipes: dict[str, Path],
    tokens: Path,
    extra: dict[str, Path] | None = None,
    tuned_dir: Path | None = None,
) -> dict:
    """`recipes`: recipe label → merged dir, the default recipe first (it is "FlexOlmo merged")."""
    from flexmoe.data.shards import TokenStream
    from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
    from flexmoe.inference.generate import generate
    from flexmoe.inference.preselect import default_preselect, preselect_hook
    from flexmoe.lifecycle.baselines import BTMEnsemble, likelihood_weights, soup
    from flexmoe.model.router import routers, routing
    from flexmoe.selection import expert_mask, expert_names
    from flexmoe.store.anchor_dir import load_anchor
    from flexmoe.store.merged import load_merged

    tok = load_tokenizer(paths["anchor"])
    tb = token_byte_lengths(tok)
    domains = [PUBLIC, *cfg.domains]
    streams = {d: TokenStream(tokens / d / "heldout") for d in domains}
    anchor, _, _ = load_anchor(paths["anchor"])
    default_label = next(iter(recipes))
    merged = load_merged(recipes[default_label])
    names = expert_names(merged)
    rows: dict[str, dict[str, float]] = {}
    console.print("[bold]▶ evaluating[/] (held-out bits per byte, lower is better)")

    def logits(m):
        return lambda ids: m(ids).logits

    lean = getattr(cfg, "lean_eval", False)
    rows["anchor (public only)"] = _bpb(logits(anchor), streams, tb, cfg)
    dense, souped = {}, None
    if cfg.baselines:
        dense = {d: load_anchor(paths[f"dense/{d}"])[0] for d in cfg.domains}
        for d, m in dense.items():  # lean: each on its own domain
            rows[f"dense expert: {d}"] = _bpb(
                logits(m), streams, tb, cfg, only=[d] if lean else None
            )
        members = [anchor, *dense.values()]
        souped = soup(members)
        rows["model soup (uniform)"] = _bpb(logits(souped), streams, tb, cfg)
        if not lean:
            calib = [TokenStream(tokens / d / "train") for d in domains]
            w = likelihood_weights(members, calib, tb, cfg.seq_len, max_tokens=cfg.eval_tokens // 4)
            rows["model soup (weighted)"] = _bpb(logits(soup(members, w)), streams, tb, cfg)
        rows["BTM (top-2 ensemble)"] = _bpb(BTMEnsemble(members, top_k=2), streams, tb, cfg)
    selectivity = {}
    for label, path in recipes.items():
        m = merged if label == default_label else load_merged(path)
        sel = recipe_eval(m, rows["anchor (public only)"], streams, tb, cfg, tok)
        selectivity[label] = sel
        if label == default_label:
            for d, r in sel["two_expert"].items():
                rows[f"2-expert: public+{d}"] = r
            rows["FlexOlmo merged"] = sel["merged"]
            if sel["preselect"]:
                rows["FlexOlmo merged (token routing alone)"] = sel["variants"]["token"]
        else:
            rows[f"FlexOlmo merged ({label})"] = sel["merged"]

    def optout_of(model) -> dict:  # in the model's default mode (its stored preselection)
        pre = default_preselect(model)
        before = (lambda s: preselect_hook(model, tok, s, pre)) if pre else None
        res = {}
        for d in cfg.domains:
            with routing(model, mask=expert_mask(model, exclude=[d])):
                res[d] = _bpb(logits(model), streams, tb, cfg, before)
        return res

    optout = optout_of(merged)
    sources = source_eval(cfg, tokens, tok, tb, anchor, merged, dense, souped)
    for label, path in (extra or {}).items():
        rows[f"ablation: {label}"] = _bpb(logits(load_merged(path)), streams, tb, cfg)
    optout_rt = None
    if tuned_dir is not None:
        tuned = load_merged(tuned_dir)
        rows["FlexOlmo merged + router tuning"] = _bpb(logits(tuned), streams, tb, cfg)
        optout_rt = optout_of(tuned)

    default_k = merged.config.num_experts_per_tok
    topk = {}
    for k in range(1, len(names) + 1) if extra else []:  # the top-k sweep is an ablation
        for r in routers(merged):
            r.top_k = k
        topk[k] = _bpb(logits(merged), streams, tb, cfg)
    for r in routers(merged):
        r.top_k = default_k

    rows_emb = torch.stack([r.weight.detach() for r in routers(merged)])  # (L, E, H)
    unit = torch.nn.functional.normalize(rows_emb, dim=-1)
    cosine = (unit @ unit.transpose(1, 2)).mean(0).tolist()

    gen_full = generate(merged, tok, cfg.prompt, max_new_tokens=24, attribution=True)
    # the expert the prompt is about (cfg.gen_exclude, e.g. code for a Python prompt), else the
    # expert with the most routing weight
    top_expert = getattr(cfg, "gen_exclude", None)
    if top_expert not in names:
        top_expert = max(
            (n for n in gen_full.attribution if n != names[0]),
            key=lambda n: gen_full.attribution[n],
        )
    gen_out = generate(
        merged, tok, cfg.prompt, max_new_tokens=24, attribution=True, exclude=[top_expert]
    )
    # the excluded expert's own effect: public + that expert only (its owner's view)
    gen_only = generate(
        merged, tok, cfg.prompt, max_new_tokens=24, attribution=True, include=[top_expert]
    )
    return {
        "domains": domains,
        "experts": names,
        "main": rows,
        "optout": optout,
        "optout_rt": optout_rt,
        "no_bias": selectivity[default_label]["variants"]["stock"],
        "sources": sources,
        "renormalize": bool(routers(merged)[0].norm_topk_prob),
        "architecture": merged.config.model_type,
        "selectivity": selectivity,
        "topk": {str(k): v for k, v in topk.items()},
        "default_top_k": default_k,
        "routing": selectivity[default_label]["routing"],
        "router_cosine": cosine,
        "generation": {
            "prompt": cfg.prompt,
            "full": _gen(gen_full),
            "excluded": top_expert,
            "without": _gen(gen_out),
            "only": _gen(gen_only),
        },
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
    }


PRESELECT = (1, 2)  # experts kept per request by the preselection variants


@torch.no_grad()
def preselect_bpb(merged, streams, tb, cfg, tokenizer, m: int) -> dict[str, float]:
    """BPB with request-level preselection of m experts (infer.preselect_hook)."""
    from flexmoe.inference.preselect import preselect_hook

    return _bpb(
        lambda ids: merged(ids).logits,
        streams,
        tb,
        cfg,
        lambda s: preselect_hook(merged, tokenizer, s, m),
    )


@torch.no_grad()
def recipe_eval(merged, anchor_row: dict, streams, tb, cfg, tokenizer) -> dict:
    """What a recipe is judged by: BPB of the merged model as configured (with its stored
    preselection, if any), of each owner's 2-expert model and of the inference variants;
    retention; public Δ vs the anchor; routing."""
    from flexmoe.inference.preselect import default_preselect, preselect_hook
    from flexmoe.model.router import routing
    from flexmoe.selection import expert_mask, expert_names

    names = expert_names(merged)
    doms = [d for d in streams if d != PUBLIC]

    def fn(ids):
        return merged(ids).logits

    lean = getattr(cfg, "lean_eval", False)  # lean: 2-expert models on public + own domain,
    # the bias and top-k-rule variants only, the stored preselection only
    two = {}
    for d in doms:
        with routing(merged, mask=expert_mask(merged, include=[d])):
            two[d] = _bpb(fn, streams, tb, cfg, only=[PUBLIC, d] if lean else None)
    token_only = _bpb(fn, streams, tb, cfg)
    variants = {"token": token_only}
    for v in ("stock", "renorm") if lean else inference_variant.VARIANTS:
        with inference_variant(merged, v):
            variants[v] = _bpb(fn, streams, tb, cfg)
    pre = default_preselect(merged)
    if experts_of(merged).domain_embeddings:
        for k in PRESELECT:
            if k < len(doms) and (not lean or k == pre):
                variants[f"preselect-{k}"] = preselect_bpb(merged, streams, tb, cfg, tokenizer, k)
    m = variants[f"preselect-{pre}"] if pre else token_only
    before = (lambda s: preselect_hook(merged, tokenizer, s, pre)) if pre else None
    shares = routing_matrix(merged, streams, cfg, before)
    ret = retention(anchor_row, m, two)
    return {
        "preselect": pre,
        "merged": m,
        "two_expert": two,
        "variants": variants,
        "retention": ret,
        "mean_retention": sum(ret.values()) / max(len(ret), 1),
        "public_delta": m[PUBLIC] / anchor_row[PUBLIC] - 1,
        "routing_diagonal": {PUBLIC: float(np.mean(shares[PUBLIC], axis=0)[0])}
        | routing_diagonal(shares, names),
        "routing": shares,
    }


SOURCES = "sources"  # tokens/sources/<domain>.<source>/heldout: one held-out stream per source


@torch.no_grad()
def source_eval(cfg, tokens, tok, tb, anchor, merged, dense, souped) -> dict:
    """Held-out BPB per source of a domain (e.g. math: generated worked problems vs manuals), so
    a headline number is not carried by templated text alone: anchor, the owner's 2-expert model,
    the dense expert, the merged model (its stored preselection) and the uniform soup."""
    from contextlib import nullcontext

    from flexmoe.data.shards import TokenStream
    from flexmoe.inference.preselect import default_preselect, preselect_hook
    from flexmoe.model.router import routing
    from flexmoe.selection import expert_mask

    root = Path(tokens) / SOURCES
    if not root.is_dir():
        return {}
    streams = {p.name: TokenStream(p / "heldout") for p in sorted(root.iterdir()) if p.is_dir()}
    out: dict[str, dict[str, float]] = {}

    def run(label, fn, before=None, mask=None):
        row = {}
        for name, s in streams.items():
            with routing(merged, mask=mask) if mask is not None else nullcontext():
                row[name] = _one(fn, s, tb, cfg, before(s) if before else None)
        out[label] = row

    def fn_of(m):
        return lambda ids: m(ids).logits

    run("anchor (public only)", fn_of(anchor))
    pre = default_preselect(merged)
    before = (lambda s: preselect_hook(merged, tok, s, pre)) if pre else None
    run("FlexOlmo merged", fn_of(merged), before)
    for d in sorted({n.split(".")[0] for n in streams}):
        if d in experts_of(merged).names:
            run(f"2-expert: public+{d}", fn_of(merged), mask=expert_mask(merged, include=[d]))
        if d in dense:
            run(f"dense expert: {d}", fn_of(dense[d]))
    if souped is not None:
        run("model soup (uniform)", fn_of(souped))
    return out


def _one(fn, stream, tb, cfg, before) -> float:
    from flexmoe.inference.bpb import evaluate_bpb

    return evaluate_bpb(
        fn, stream, tb, cfg.seq_len, max_tokens=cfg.eval_tokens, before_batch=before
    )["bpb"]


def _gen(g) -> dict:
    return {"text": g.text, "active": g.active, "attribution": g.attribution}


@torch.no_grad()
def routing_matrix(model, streams, cfg, before=None) -> dict[str, list[list[float]]]:
    """Per domain: (layers × experts) share of routing weight over that domain's held-out tokens;
    before(stream) → a hook run with each batch's window starts (e.g. preselection)."""
    from contextlib import nullcontext

    import numpy as np

    from flexmoe.inference.bpb import eval_windows
    from flexmoe.model.router import routing

    n = model.config.num_experts
    out = {}
    for d, s in streams.items():
        # at least 2,048 tokens per domain: a lean evaluation's quarter would be a few windows
        starts = eval_windows(s, cfg.seq_len, max(cfg.eval_tokens // 4, 2048))
        ids = torch.from_numpy(np.stack([s.window(x, cfg.seq_len) for x in starts]))
        hook = before(s) if before else None
        with routing(model, record=True) as records:
            for i in range(0, len(ids), 8):
                with (hook(starts[i : i + 8]) if hook else None) or nullcontext():
                    model(ids[i : i + 8])
        mat = []
        for recs in records:
            tot = torch.zeros(n, dtype=torch.float64)
            for idx, val in recs:
                tot.index_add_(0, idx.reshape(-1).cpu(), val.reshape(-1).double().cpu())
            mat.append((tot / tot.sum()).tolist())
        out[d] = mat
    return out


def retention(anchor: dict, merged: dict, two_expert: dict[str, dict]) -> dict[str, float]:
    """Per domain: (anchor − merged) / (anchor − owner's 2-expert model) held-out BPB — the share
    of an expert's gain on its own domain that survives the merge."""
    out = {}
    for d, row in two_expert.items():
        gain = anchor[d] - row[d]
        out[d] = (anchor[d] - merged[d]) / gain if gain > 0 else float("nan")
    return out


def routing_diagonal(routing: dict, experts: list[str]) -> dict[str, float]:
    """Share of routing weight (mean over layers) the text of each domain gives its own expert."""
    import numpy as np

    return {
        d: float(np.mean(m, axis=0)[experts.index(d)]) for d, m in routing.items() if d in experts
    }


class inference_variant:
    """`with inference_variant(model, v):` run a merged model with one router change, restored on
    exit: 'stock' (b = 0, what stock transformers computes), 'renorm' (the other top-k rule:
    renormalised as Mixtral does ⇄ not, as FlexOlmo), 'equal-norm' (every router row rescaled to
    the layer's mean row norm, i.e. cosine routing with one shared temperature per layer)."""

    VARIANTS = ("stock", "renorm", "equal-norm")

    def __init__(self, model, variant: str):
        from flexmoe.model.router import routers

        self.rs, self.variant = routers(model), variant

    def __enter__(self):
        self.saved = [(r.use_bias, r.norm_topk_prob, r.weight.detach().clone()) for r in self.rs]
        for r in self.rs:
            if self.variant == "stock":
                r.use_bias = False
            elif self.variant == "renorm":  # the other top-k rule than the architecture's
                r.norm_topk_prob = not r.norm_topk_prob
            elif self.variant == "equal-norm":
                with torch.no_grad():
                    n = r.weight.norm(dim=-1, keepdim=True)
                    r.weight.mul_(n.mean() / n.clamp(min=1e-12))
            else:
                raise ValueError(self.variant)
        return self

    def __exit__(self, *exc):
        for r, (b, nt, w) in zip(self.rs, self.saved, strict=True):
            r.use_bias, r.norm_topk_prob = b, nt
            with torch.no_grad():
                r.weight.copy_(w)
        return False


@torch.no_grad()
def selectivity_summary(cfg, anchor_dir: Path, merged_dir: Path, tokens: Path) -> dict:
    """recipe_eval of one merged directory against its anchor (scripts/sweep_recipe.py)."""
    from flexmoe.data.shards import TokenStream
    from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
    from flexmoe.store.anchor_dir import load_anchor
    from flexmoe.store.merged import load_merged

    tok = load_tokenizer(anchor_dir)
    tb = token_byte_lengths(tok)
    streams = {d: TokenStream(tokens / d / "heldout") for d in [PUBLIC, *cfg.domains]}
    anchor = load_anchor(anchor_dir)[0]
    a = _bpb(lambda ids: anchor(ids).logits, streams, tb, cfg)
    res = recipe_eval(load_merged(merged_dir), a, streams, tb, cfg, tok)
    return {"anchor": a, **res, "baselines": {}}


# ---------------------------------------------------------------- output
def _fmt(v: float) -> str:
    return "–" if v != v else f"{v:.3f}"  # NaN: not evaluated (lean evaluation)


ROW_ORDER = (
    "anchor",
    "dense expert",
    "model soup",
    "BTM",
    "2-expert",
    "FlexOlmo merged",
    "FlexOlmo merged + router tuning",
    "ablation",
)


def row_order(names) -> list[str]:
    """Table order by model family (results.json stores rows with sorted keys)."""

    def rank(n: str) -> int:
        return max(i for i, p in enumerate(ROW_ORDER) if n.startswith(p))

    return sorted(names, key=lambda n: (rank(n), n))


def main_table_md(results: dict) -> str:
    cols = [*results["domains"], "mean"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    best = {  # NaN: not evaluated (lean evaluation), never the best
        c: min((r[c] for r in results["main"].values() if r[c] == r[c]), default=None) for c in cols
    }
    for name in row_order(results["main"]):
        r = results["main"][name]
        cells = [f"**{_fmt(r[c])}**" if r[c] == best[c] else _fmt(r[c]) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_main_table(results: dict) -> None:
    cols = [*results["domains"], "mean"]
    t = Table(title="held-out bits per byte (lower is better)")
    t.add_column("model")
    for c in cols:
        t.add_column(c, justify="right")
    for name in row_order(results["main"]):
        t.add_row(name, *[_fmt(results["main"][name][c]) for c in cols])
    Console().print(t)
    oo = Table(title="opt-out: FlexOlmo merged with one expert excluded")
    oo.add_column("excluded")
    for c in cols:
        oo.add_column(c, justify="right")
    full = results["main"]["FlexOlmo merged"]
    oo.add_row("(none)", *[_fmt(full[c]) for c in cols])
    for d, r in results["optout"].items():
        oo.add_row(d, *[_fmt(r[c]) for c in cols])
    Console().print(oo)
    sel = results.get("selectivity") or {}
    if sel:
        doms = [d for d in results["domains"] if d != PUBLIC]
        st = Table(title="selective experts: recipes side by side")
        cols = ["recipe", "public Δ", *[f"ret. {d}" for d in doms], "mean ret.", "merged"]
        for c in [*cols, "route pub", "route own (min)"]:
            st.add_column(c, justify="left" if c == "recipe" else "right")
        for label, r in sel.items():
            diag = r["routing_diagonal"]
            st.add_row(
                label,
                f"{r['public_delta']:+.1%}",
                *[f"{r['retention'][d]:.0%}" for d in doms],
                f"{r['mean_retention']:.0%}",
                _fmt(r["merged"]["mean"]),
                f"{diag[PUBLIC]:.2f}",
                f"{min(diag[d] for d in doms):.2f}",
            )
        Console().print(st)
    g = results["generation"]
    Console().print(
        f"\n[bold]generation[/] prompt {g['prompt']!r}\n  all experts: {g['full']['text']!r}"
        f"\n  attribution: "
        + ", ".join(f"{k} {v:.0%}" for k, v in g["full"]["attribution"].items())
        + f"\n  without '{g['excluded']}': {g['without']['text']!r}"
        + (f"\n  public + '{g['excluded']}' only: {g['only']['text']!r}" if g.get("only") else "")
    )


def write_report(results: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    plots = make_plots(results, out)
    doms = results["domains"]
    cols = [*doms, "mean"]
    full = results["main"]["FlexOlmo merged"]
    md = [
        "# flexmoe demo report",
        "",
        "Held-out bits per byte on FlexMix-mini (lower is better). Produced by `make demo` "
        "(`python scripts/demo.py`); rebuild this file with `flexmoe report "
        f"{out.parent}`.",
        "",
        "## Main table",
        "",
        main_table_md(results),
        "",
        "## Opt-out",
        "",
        "FlexOlmo merged with one expert excluded at inference "
        "(no retraining; exact by construction).",
        "",
        "| excluded | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        "| (none) | " + " | ".join(_fmt(full[c]) for c in cols) + " |",
    ]
    for d, r in results["optout"].items():
        md.append(f"| {d} | " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    if results.get("optout_rt"):
        tuned = results["main"]["FlexOlmo merged + router tuning"]
        md += [
            "",
            "## Router tuning (RT)",
            "",
            "Routers tuned on the owners' public proxies (experts frozen). The exact opt-out "
            "guarantee holds for the un-tuned model; below, each expert excluded from the "
            "router-tuned model (Δ vs the same model with all experts).",
            "",
            "| excluded | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
            "| (none), no RT | " + " | ".join(_fmt(full[c]) for c in cols) + " |",
            "| (none), RT | " + " | ".join(_fmt(tuned[c]) for c in cols) + " |",
        ]
        for d, r in results["optout_rt"].items():
            md.append(
                f"| {d}, RT | "
                + " | ".join(f"{_fmt(r[c])} ({r[c] - tuned[c]:+.3f})" for c in cols)
                + " |"
            )
    md += selectivity_md(results)
    nb = results["no_bias"]
    md += [
        "",
        "## Ablation: router bias",
        "",
        "Stock transformers' FlexOlmo has no router bias; the stock-loadable export runs "
        "with b = 0.",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        "| with bias (flexmoe loader) | " + " | ".join(_fmt(full[c]) for c in cols) + " |",
        "| without bias (stock load) | " + " | ".join(_fmt(nb[c]) for c in cols) + " |",
        "",
    ]
    src = results.get("sources") or {}
    if src:
        names_s = list(next(iter(src.values())))
        md += [
            "## Per source",
            "",
            "Held-out BPB per source of a domain, so a domain's number is not carried by one "
            "kind of text (math: generated worked problems vs the Maxima and GAP manuals).",
            "",
            "| model | " + " | ".join(names_s) + " |",
            "|---|" + "---:|" * len(names_s),
        ]
        md += [f"| {m} | " + " | ".join(_fmt(r[n]) for n in names_s) + " |" for m, r in src.items()]
        md.append("")
    if "renormalize" in results:
        rn = results["selectivity"][next(iter(results["selectivity"]))]["variants"].get("renorm")
        rule = "renormalises" if results["renormalize"] else "does not renormalise"
        md += [
            "## Top-k renormalisation",
            "",
            f"The merged model ({results['architecture']}) {rule} its top-k routing weights, as "
            "its stock class does. The same model with the other rule:",
            "",
            "| rule | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
            f"| as merged ({'renormalised' if results['renormalize'] else 'not renormalised'}, "
            "token routing) | "
            + " | ".join(
                _fmt(
                    results["selectivity"][next(iter(results["selectivity"]))]["variants"]["token"][
                        c
                    ]
                )
                for c in cols
            )
            + " |",
        ]
        if rn:
            md.append(
                f"| {'not renormalised' if results['renormalize'] else 'renormalised'} | "
                + " | ".join(_fmt(rn[c]) for c in cols)
                + " |"
            )
        md.append("")
    if results["topk"]:
        md += [
            "## Active experts (top-k)",
            "",
            "| k | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        md += [
            f"| {k} | " + " | ".join(_fmt(r[c]) for c in cols) + " |"
            for k, r in results["topk"].items()
        ]
    names = results["experts"]
    md += [
        "",
        "## Router embeddings",
        "",
        "Cosine similarity of the router rows (mean over layers).",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for n, row in zip(names, results["router_cosine"], strict=True):
        md.append(f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    g = results["generation"]
    md += [
        "",
        "## Generation with attribution",
        "",
        f"Prompt: `{g['prompt']}`",
        "",
        f"- all experts: `{g['full']['text']!r}` — attribution "
        + ", ".join(f"{k} {v:.0%}" for k, v in g["full"]["attribution"].items()),
        f"- without `{g['excluded']}`: `{g['without']['text']!r}` — attribution "
        + ", ".join(f"{k} {v:.0%}" for k, v in g["without"]["attribution"].items()),
    ]
    if g.get("only"):
        md.append(
            f"- public + `{g['excluded']}` only: `{g['only']['text']!r}` — attribution "
            + ", ".join(f"{k} {v:.0%}" for k, v in g["only"]["attribution"].items())
        )
    md += [
        "",
        "## Plots",
        "",
    ] + [f"![{p.stem}]({p.name})" for p in plots]
    with atomic_file(out / "report.md") as f:
        f.write("\n".join(md) + "\n")
    return out


VARIANT_LABELS = {
    "token": "token routing alone (no preselection)",
    "stock": "stock loader (b = 0)",
    "renorm": "the other top-k rule (renormalised ⇄ not)",
    "equal-norm": "router rows with equalised norms",
    "preselect-1": "preselect 1 expert per request",
    "preselect-2": "preselect 2 experts per request",
}


def selectivity_md(results: dict) -> list[str]:
    """Recipes side by side: public Δ, retention, routing, inference variants."""
    sel = results.get("selectivity")
    if not sel:
        return []
    doms = [d for d in results["domains"] if d != PUBLIC]
    cols = [*results["domains"], "mean"]
    md = [
        "",
        "## Selective experts: recipes side by side",
        "",
        "Retention = (anchor − merged) / (anchor − the owner's 2-expert model), held-out BPB on "
        "the owner's domain: the share of an expert's own gain that survives the merge. Routing = "
        "share of routing weight (mean over layers) that a domain's text gives its own expert "
        "(the public expert for public text).",
        "",
        "| recipe | public Δ vs anchor | "
        + " | ".join(f"retention {d}" for d in doms)
        + " | mean retention | merged mean BPB | "
        + " | ".join(f"routing {d}" for d in results["domains"])
        + " |",
        "|---|" + "---:|" * (3 + 2 * len(doms) + 1),
    ]
    for label, r in sel.items():
        md.append(
            f"| {label} | {r['public_delta']:+.1%} | "
            + " | ".join(f"{r['retention'][d]:.0%}" for d in doms)
            + f" | {r['mean_retention']:.0%} | {r['merged']['mean']:.3f} | "
            + " | ".join(f"{r['routing_diagonal'][d]:.2f}" for d in results["domains"])
            + " |"
        )
    for label, r in sel.items():
        md += [
            "",
            f"Routing matrix, {label} (rows: text; columns: experts; mean over layers):",
            "",
            "| text \\ expert | " + " | ".join(results["experts"]) + " |",
            "|---|" + "---:|" * len(results["experts"]),
        ]
        for d in results["domains"]:
            row = np.mean(r["routing"][d], axis=0)
            md.append(f"| {d} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    md += [
        "",
        "Inference variants of each merged model (same weights; held-out BPB):",
        "",
        "| recipe | variant | " + " | ".join(cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for label, r in sel.items():
        md.append(
            f"| {label} | as merged | " + " | ".join(_fmt(r["merged"][c]) for c in cols) + " |"
        )
        for v, row in r["variants"].items():
            md.append(
                f"| {label} | {VARIANT_LABELS.get(v, v)} | "
                + " | ".join(_fmt(row[c]) for c in cols)
                + " |"
            )
    return md


def make_plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    doms, names = results["domains"], results["experts"]
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    def heatmap(mat, rows, cols, cmap, fmt, label, title, name, **kw) -> None:
        fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 0.6 * len(rows) + 1.5))
        im = ax.imshow(mat, cmap=cmap, **kw)
        ax.set_xticks(range(len(cols)), cols, rotation=30)
        ax.set_yticks(range(len(rows)), rows)
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8)
        fig.colorbar(im, label=label)
        ax.set_title(title)
        save(fig, name)

    full = results["main"]["FlexOlmo merged"]
    optout = results["optout"]
    heatmap(
        np.array([[optout[e][d] - full[d] for d in doms] for e in optout]),
        [f"without {e}" for e in optout],
        doms,
        "Reds",
        "+.3f",
        "Δ BPB vs all experts",
        "opt-out: held-out BPB change",
        "optout.png",
    )
    heatmap(
        np.array([np.mean(results["routing"][d], axis=0) for d in doms]),
        doms,
        names,
        "Blues",
        ".2f",
        "share of routing weight",
        "routing: held-out tokens of each domain → experts",
        "routing.png",
        vmin=0,
        vmax=1,
    )
    # top-k curve (ablation runs only)
    ks = sorted(int(k) for k in results["topk"])
    if ks:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key, marker in (("mean", "o"), ("closed mean", "s")):
            ax.plot(ks, [results["topk"][str(k)][key] for k in ks], marker=marker, label=key)
        ax.set_xlabel("active experts per token (top-k)")
        ax.set_ylabel("held-out BPB")
        ax.legend()
        ax.set_title("top-k")
        save(fig, "topk.png")
    # main table bars
    models = row_order(results["main"])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(models) + 1.5))
    ax.barh(range(len(models)), [results["main"][m]["mean"] for m in models], color="tab:gray")
    ax.set_yticks(range(len(models)), models)
    ax.invert_yaxis()
    ax.set_xlabel("mean held-out BPB (lower is better)")
    save(fig, "main.png")
    return paths


def rebuild(run_dir: Path) -> Path:
    """`flexmoe report RUN_DIR`: report.md and plots from RUN_DIR/report/results.json."""
    from flexmoe.errors import FlexmoeError

    res = Path(run_dir) / "report" / "results.json"
    if not res.is_file():
        raise FlexmoeError(f"no results at {res} (run the demo or an evaluation first)")
    return write_report(json.loads(res.read_text()), res.parent)


def tasks_md(results: dict[str, dict[str, dict[str, float]]], limit: int) -> str:
    """Table-1-style markdown: one row per model, one column per task (acc_norm for multiple
    choice, bits per byte of the gold answer for generative tasks)."""
    tasks = list(next(iter(results.values())))

    def cell(m: dict) -> str:
        v = m.get("acc_norm", m.get("acc", m.get("bits_per_byte")))
        return "–" if v is None else f"{v:.3f}"

    md = [
        "# Downstream tasks",
        "",
        f"`flexmoe eval tasks`, {limit} documents per task; multiple choice: acc_norm (higher is "
        "better), gold-answer tasks: bits per byte (lower is better).",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    md += [f"| {m} | " + " | ".join(cell(r[t]) for t in tasks) + " |" for m, r in results.items()]
    return "\n".join(md) + "\n"
