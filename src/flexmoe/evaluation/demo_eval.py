"""The measurements behind a demo run's report: main table, opt-out matrix, routing matrix,
top-k curve, no-bias ablation, router-embedding similarity, a generation with attribution.

Everything here is measured on held-out splits the models never trained on; nothing is tuned
on them. The results are plain dicts (results.json), with the scored windows of every main-table
and opt-out row and the 95% intervals computed from them (flexmoe.evaluation.intervals);
flexmoe.demo.render turns them into text and plots.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from flexmoe.data.corpus import PUBLIC
from flexmoe.data.shards import TokenStream
from flexmoe.data.tokenizer import load_tokenizer, token_byte_lengths
from flexmoe.evaluation.intervals import OPTOUT, OPTOUT_RT, VARIANT, demo_intervals
from flexmoe.inference.bpb import eval_windows, evaluate_bpb
from flexmoe.inference.generate import generate
from flexmoe.inference.preselect import PRESELECT_CONTEXT, default_preselect, preselect_hook
from flexmoe.lifecycle.baselines import BTMEnsemble, likelihood_weights, soup
from flexmoe.model.arch import check_dense, family_of
from flexmoe.model.router import RoutingTrace, routers, routing
from flexmoe.selection import expert_mask, expert_names
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.fsutil import write_json
from flexmoe.store.merged import experts_of, load_merged

console = Console(stderr=True)


@dataclass(frozen=True)
class EvalSettings:
    """What the evaluation reads from a run's settings (the demo builds it with
    DemoConfig.eval_settings())."""

    domains: tuple[str, ...]  # the closed domains; public is always evaluated too
    seq_len: int  # tokens per evaluation window
    eval_tokens: int  # held-out tokens per domain and model
    baselines: bool  # dense experts, model soups and BTM are in the run
    prompt: str  # the generation with attribution
    lean_eval: bool = False  # fewer evaluation passes (see recipe_eval)
    gen_exclude: str | None = None  # the expert excluded in the second generation
    preselect_context: int = PRESELECT_CONTEXT  # tokens before a window that preselection reads
    # rows already scored (one JSON file per row and domain), so a long evaluation resumes where
    # it stopped and a larger run reuses the rows of the models it shares; specific to the
    # scoring settings and held-out tokens (the caller's choice); None: nothing kept
    cache_dir: str | None = None
    topk_sweep: bool = True  # with ablations: BPB of the merged model at every top-k


def stage_id(path: Path) -> str | None:
    """What built a model directory: the spec hash in the stage marker beside it
    (<parent>/.<name>.json, flexmoe.demo.stages.run_stage); None without a marker."""
    marker = Path(path).parent / f".{Path(path).name}.json"
    try:
        return str(json.loads(marker.read_text())["spec_hash"])[:16]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def row_key(label: str, *models: Path) -> str | None:
    """A cache key: the row's label and the stage ids of the models it is computed from; None
    (not kept) when one of them has no marker."""
    ids = [stage_id(m) for m in models]
    return None if None in ids else "|".join([label, *ids])


def _cached(settings: EvalSettings, key: str | None, compute):
    """compute() (a JSON-able value), kept under settings.cache_dir by `key` (row_key: the row
    and the models it is computed from; the directory fixes the scoring settings)."""
    if settings.cache_dir is None or key is None:
        return compute()
    path = Path(settings.cache_dir) / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if path.is_file():
        got = json.loads(path.read_text())
        if got.get("key") == key:
            return got["value"]
    value = compute()
    write_json(path, {"key": key, "value": value})
    return value


class BPBRow(dict):
    """A row of per-domain BPB (a plain dict in results.json) that also carries, in `.windows`,
    the scored windows ({domain: [[nll_nats, bytes], ...]}) of each domain it measured; the
    report's intervals are computed from them (results["windows"], results["intervals"])."""

    def __init__(self, values: dict, windows: dict | None = None):
        super().__init__(values)
        self.windows = windows or {}


def _bpb(
    model_fn, streams, tb, settings: EvalSettings, before=None, only=None, key: str | None = None
) -> BPBRow:
    """Per-domain BPB plus the mean and closed mean; before(stream) → a before_batch hook.
    `only`: evaluate these domains, NaN for the rest (lean evaluation; no windows for them).
    `key` names the row in settings.cache_dir (each domain is kept as soon as it is scored)."""
    res, windows = {}, {}
    for d, s in streams.items():
        if only is not None and d not in only:
            res[d] = float("nan")
            continue
        r = _cached(
            settings,
            None if key is None else f"{key}|{d}",
            lambda s=s: evaluate_bpb(
                model_fn,
                s,
                tb,
                settings.seq_len,
                max_tokens=settings.eval_tokens,
                before_batch=before(s) if before else None,
            ),
        )
        res[d], windows[d] = r["bpb"], r["windows"]
    closed = [v for d, v in res.items() if d != PUBLIC]
    res["mean"] = sum(res[d] for d in streams) / len(streams)
    res["closed mean"] = sum(closed) / max(len(closed), 1)
    return BPBRow(res, windows)


@torch.no_grad()
def evaluate_all(
    settings: EvalSettings,
    paths: dict[str, Path],
    recipes: dict[str, Path],
    tokens: Path,
    extra: dict[str, Path] | None = None,
    tuned_dir: Path | None = None,
) -> dict:
    """`recipes`: recipe label → merged dir, the default recipe first (it is "FlexOlmo merged").

    Besides the BPB tables, results["windows"] holds the scored windows ([nll_nats, bytes] per
    window, per measured domain) of every main-table row and of every opt-out row ("optout: <e>",
    "optout (router tuning): <e>"), and results["intervals"] the 95% intervals computed from them
    (flexmoe.evaluation.intervals.demo_intervals)."""
    tok = load_tokenizer(paths["anchor"])
    tb = token_byte_lengths(tok)
    domains = [PUBLIC, *settings.domains]
    streams = {d: TokenStream(tokens / d / "heldout") for d in domains}
    anchor, _, _ = load_anchor(paths["anchor"])
    default_label = next(iter(recipes))
    merged = load_merged(recipes[default_label])
    names = expert_names(merged)
    rows: dict[str, dict[str, float]] = {}
    console.print("[bold]▶ evaluating[/] (held-out bits per byte, lower is better)")

    def logits(m):
        return lambda ids: m(ids).logits

    lean = settings.lean_eval

    def row(label, fn, *models, before=None, only=None):  # a main-table row, kept as scored
        key = row_key(label + ("|lean" if only else ""), *models)
        rows[label] = _bpb(fn, streams, tb, settings, before, only, key=key)
        return rows[label]

    row("anchor (public only)", logits(anchor), paths["anchor"])
    dense, souped = {}, None
    dense_paths = [paths[f"dense/{d}"] for d in settings.domains] if settings.baselines else []
    if settings.baselines:
        dense = {d: load_anchor(paths[f"dense/{d}"])[0] for d in settings.domains}
        for d, m in dense.items():  # lean: each on its own domain
            row(f"dense expert: {d}", logits(m), paths[f"dense/{d}"], only=[d] if lean else None)
        members = [anchor, *dense.values()]
        souped = soup(members)
        row("model soup (uniform)", logits(souped), paths["anchor"], *dense_paths)
        # weights from the owners' training streams (each owner could compute its own model's
        # likelihood on a shared calibration mix), never from the held-out splits
        calib = [TokenStream(tokens / d / "train") for d in domains]
        w = _cached(
            settings,
            row_key("soup weights", paths["anchor"], *dense_paths),
            lambda: likelihood_weights(
                members, calib, tb, settings.seq_len, max_tokens=settings.eval_tokens // 4
            ),
        )
        row("model soup (weighted)", logits(soup(members, w)), paths["anchor"], *dense_paths)
        row("BTM (top-2 ensemble)", BTMEnsemble(members, top_k=2), paths["anchor"], *dense_paths)
    control = None
    if "control" in paths:  # adaptation to FlexMix-style text without any owner's data
        control = load_anchor(paths["control"])[0]
        row("control: anchor continued on public", logits(control), paths["control"])
    selectivity = {}
    for label, path in recipes.items():
        m = merged if label == default_label else load_merged(path)
        sel = recipe_eval(
            m, rows["anchor (public only)"], streams, tb, settings, tok, key=row_key(label, path)
        )
        selectivity[label] = sel
        if label == default_label:
            for d, r in sel["two_expert"].items():
                rows[f"2-expert: public+{d}"] = r
            rows["FlexOlmo merged"] = sel["merged"]
            if sel["preselect"]:
                rows["FlexOlmo merged (token routing alone)"] = sel["variants"]["token"]
        else:
            rows[f"FlexOlmo merged ({label})"] = sel["merged"]

    def before_of(model):  # the model's default mode: its stored preselection, if any
        pre = default_preselect(model)
        if not pre:
            return None
        return lambda s: preselect_hook(model, tok, s, pre, settings.preselect_context)

    if control is not None:  # the merge with the control's FFN as its public expert
        with public_ffn(merged, control):
            row(
                "FlexOlmo merged, public expert = control",
                logits(merged),
                recipes[default_label],
                paths["control"],
                before=before_of(merged),
            )

    def optout_of(model, tag: str, path: Path) -> dict:
        res = {}
        for d in settings.domains:
            with routing(model, mask=expert_mask(model, exclude=[d])):
                key = row_key(f"{tag}{d}", path)
                res[d] = _bpb(logits(model), streams, tb, settings, before_of(model), key=key)
        return res

    optout = optout_of(merged, OPTOUT, recipes[default_label])
    sources = source_eval(
        settings,
        tokens,
        tok,
        tb,
        anchor,
        merged,
        dense,
        souped,
        key=row_key("sources", paths["anchor"], recipes[default_label], *dense_paths),
    )
    for label, path in (extra or {}).items():
        row(f"ablation: {label}", logits(load_merged(path)), path)
    optout_rt = None
    if tuned_dir is not None:
        tuned = load_merged(tuned_dir)
        row("FlexOlmo merged + router tuning", logits(tuned), tuned_dir)
        optout_rt = optout_of(tuned, OPTOUT_RT, tuned_dir)

    default_k = merged.config.num_experts_per_tok
    topk = {}
    sweep = extra and settings.topk_sweep  # the top-k sweep is an ablation
    for k in range(1, len(names) + 1) if sweep else []:
        for r in routers(merged):
            r.top_k = k
        key = row_key(f"top-k {k}", recipes[default_label])
        topk[k] = _bpb(logits(merged), streams, tb, settings, key=key)
    for r in routers(merged):
        r.top_k = default_k

    rows_emb = torch.stack([r.weight.detach() for r in routers(merged)])  # (L, E, H)
    unit = torch.nn.functional.normalize(rows_emb, dim=-1)
    cosine = (unit @ unit.transpose(1, 2)).mean(0).tolist()

    # the scored windows of every main-table and opt-out row, and the intervals from them
    windows = {k: r.windows for k, r in rows.items() if isinstance(r, BPBRow)}
    windows |= {f"{OPTOUT}{d}": r.windows for d, r in optout.items()}
    windows |= {f"{OPTOUT_RT}{d}": r.windows for d, r in (optout_rt or {}).items()}
    windows |= {
        f"{VARIANT}{label}: {v}": r.windows
        for label, sel in selectivity.items()
        for v, r in sel["variants"].items()
        if isinstance(r, BPBRow)
    }
    intervals = demo_intervals(windows, domains, settings.seq_len)

    gen_full = generate(merged, tok, settings.prompt, max_new_tokens=24, attribution=True)
    # the expert the prompt is about (settings.gen_exclude, e.g. code for a Python prompt), else
    # the expert with the most routing weight
    top_expert = settings.gen_exclude
    if top_expert not in names:
        top_expert = max(
            (n for n in gen_full.attribution if n != names[0]),
            key=lambda n: gen_full.attribution[n],
        )
    gen_out = generate(
        merged, tok, settings.prompt, max_new_tokens=24, attribution=True, exclude=[top_expert]
    )
    # the excluded expert's own effect: public + that expert only (its owner's view)
    gen_only = generate(
        merged, tok, settings.prompt, max_new_tokens=24, attribution=True, include=[top_expert]
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
        "router_bias": family_of(merged.config.model_type).router_bias,
        "architecture": merged.config.model_type,
        "selectivity": selectivity,
        "topk": {str(k): v for k, v in topk.items()},
        "default_top_k": default_k,
        "routing": selectivity[default_label]["routing"],
        "router_cosine": cosine,
        "generation": {
            "prompt": settings.prompt,
            "full": _gen(gen_full),
            "excluded": top_expert,
            "without": _gen(gen_out),
            "only": _gen(gen_only),
        },
        "windows": windows,
        "intervals": intervals,
    }


PRESELECT = (1, 2)  # experts kept per request by the preselection variants


@torch.no_grad()
def preselect_bpb(
    merged, streams, tb, settings: EvalSettings, tokenizer, m: int, key: str | None = None
) -> dict[str, float]:
    """BPB with request-level preselection of m experts (inference.preselect.preselect_hook)."""
    return _bpb(
        lambda ids: merged(ids).logits,
        streams,
        tb,
        settings,
        lambda s: preselect_hook(merged, tokenizer, s, m, settings.preselect_context),
        key=key,
    )


@torch.no_grad()
def recipe_eval(
    merged,
    anchor_row: dict,
    streams,
    tb,
    settings: EvalSettings,
    tokenizer,
    key: str | None = None,
) -> dict:
    """What a recipe is judged by: BPB of the merged model as configured (with its stored
    preselection, if any), of each owner's 2-expert model and of the inference variants;
    retention; public Δ vs the anchor; routing. `key` (row_key of the merged model) names the
    recipe's rows in settings.cache_dir; None: not kept."""

    def sub(name: str) -> str | None:
        return None if key is None else f"{key}|{name}"

    names = expert_names(merged)
    doms = [d for d in streams if d != PUBLIC]

    def fn(ids):
        return merged(ids).logits

    lean = settings.lean_eval  # lean: 2-expert models on public + own domain,
    # the bias variant only, the stored preselection only
    two = {}
    for d in doms:
        with routing(merged, mask=expert_mask(merged, include=[d])):
            two[d] = _bpb(
                fn,
                streams,
                tb,
                settings,
                only=[PUBLIC, d] if lean else None,
                key=sub(f"2-{d}" + ("|lean" if lean else "")),
            )
    token_only = _bpb(fn, streams, tb, settings, key=sub("token"))
    variants = {"token": token_only}
    for v in ("stock",) if lean else inference_variant.VARIANTS:
        with inference_variant(merged, v):
            variants[v] = _bpb(fn, streams, tb, settings, key=sub(v))
    pre = default_preselect(merged)
    if experts_of(merged).domain_embeddings:
        for k in PRESELECT:
            if k < len(doms) and (not lean or k == pre):
                variants[f"preselect-{k}"] = preselect_bpb(
                    merged, streams, tb, settings, tokenizer, k, key=sub(f"preselect-{k}")
                )
    m = variants[f"preselect-{pre}"] if pre else token_only
    before = (
        (lambda s: preselect_hook(merged, tokenizer, s, pre, settings.preselect_context))
        if pre
        else None
    )
    shares = routing_matrix(merged, streams, settings, before)
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
def source_eval(
    settings: EvalSettings, tokens, tok, tb, anchor, merged, dense, souped, key: str | None = None
) -> dict:
    """Held-out BPB per source of a domain (e.g. math: generated worked problems vs manuals), so
    a headline number is not carried by templated text alone: anchor, the owner's 2-expert model,
    the dense expert, the merged model (its stored preselection) and the uniform soup."""
    root = Path(tokens) / SOURCES
    if not root.is_dir():
        return {}
    streams = {p.name: TokenStream(p / "heldout") for p in sorted(root.iterdir()) if p.is_dir()}
    out: dict[str, dict[str, float]] = {}

    def run(label, fn, before=None, mask=None):
        row = {}
        for name, s in streams.items():
            with routing(merged, mask=mask) if mask is not None else nullcontext():
                row[name] = _cached(
                    settings,
                    None if key is None else f"{key}|{label}|{name}",
                    lambda fn=fn, s=s: _one(fn, s, tb, settings, before(s) if before else None),
                )
        out[label] = row

    def fn_of(m):
        return lambda ids: m(ids).logits

    run("anchor (public only)", fn_of(anchor))
    pre = default_preselect(merged)
    before = (
        (lambda s: preselect_hook(merged, tok, s, pre, settings.preselect_context)) if pre else None
    )
    run("FlexOlmo merged", fn_of(merged), before)
    for d in sorted({n.split(".")[0] for n in streams}):
        if d in experts_of(merged).names:
            run(f"2-expert: public+{d}", fn_of(merged), mask=expert_mask(merged, include=[d]))
        if d in dense:
            run(f"dense expert: {d}", fn_of(dense[d]))
    if souped is not None:
        run("model soup (uniform)", fn_of(souped))
    return out


def _one(fn, stream, tb, settings: EvalSettings, before) -> float:
    return evaluate_bpb(
        fn, stream, tb, settings.seq_len, max_tokens=settings.eval_tokens, before_batch=before
    )["bpb"]


def _gen(g) -> dict:
    return {"text": g.text, "active": g.active, "attribution": g.attribution}


@torch.no_grad()
def routing_matrix(
    model, streams, settings: EvalSettings, before=None
) -> dict[str, list[list[float]]]:
    """Per domain: (layers × experts) share of routing weight over that domain's held-out tokens;
    before(stream) → a hook run with each batch's window starts (e.g. preselection)."""
    n = model.config.num_experts
    out = {}
    for d, s in streams.items():
        # at least 2,048 tokens per domain: a lean evaluation's quarter would be a few windows
        starts = eval_windows(s, settings.seq_len, max(settings.eval_tokens // 4, 2048))
        ids = torch.from_numpy(np.stack([s.window(x, settings.seq_len) for x in starts]))
        hook = before(s) if before else None
        with routing(model, record=True) as records:
            for i in range(0, len(ids), 8):
                with (hook(starts[i : i + 8]) if hook else None) or nullcontext():
                    model(ids[i : i + 8])
        out[d] = [(t / t.sum()).tolist() for t in RoutingTrace(records, n).layer_weights()]
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
    return {
        d: float(np.mean(m, axis=0)[experts.index(d)]) for d, m in routing.items() if d in experts
    }


class public_ffn:
    """`with public_ffn(merged, dense):` the merged model with its public expert (expert 0, the
    anchor's FFN) replaced by `dense`'s FFNs, restored on exit. Attention, norms and embeddings
    stay the anchor's, as the owners' experts were trained against them."""

    def __init__(self, merged, dense):
        self.merged, self.dense = merged, dense
        self.keys = check_dense(dense.config).keys

    def __enter__(self):
        k, sd = self.keys, self.dense.state_dict()
        params = dict(self.merged.named_parameters())
        self.saved = []
        for i in range(self.merged.config.num_hidden_layers):
            p = f"model.layers.{i}.mlp"
            gate_up = params[f"{p}.{k.experts_gate_up}"]
            down = params[f"{p}.{k.experts_down}"]
            self.saved.append((gate_up, gate_up[0].clone(), down, down[0].clone()))
            with torch.no_grad():
                gate_up[0].copy_(torch.cat([sd[f"{p}.{k.gate}"], sd[f"{p}.{k.up}"]], dim=0))
                down[0].copy_(sd[f"{p}.{k.down}"])
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for gate_up, g0, down, d0 in self.saved:
                gate_up[0].copy_(g0)
                down[0].copy_(d0)
        return False


class inference_variant:
    """`with inference_variant(model, v):` run a merged model with one router change, restored on
    exit: 'stock' (b = 0, what stock transformers computes), 'renorm' (the other top-k rule:
    renormalised as Mixtral does ⇄ not, as FlexOlmo), 'equal-norm' (every router row rescaled to
    the layer's mean row norm, i.e. cosine routing with one shared temperature per layer)."""

    VARIANTS = ("stock", "renorm", "equal-norm")

    def __init__(self, model, variant: str):
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
def selectivity_summary(
    settings: EvalSettings, anchor_dir: Path, merged_dir: Path, tokens: Path
) -> dict:
    """recipe_eval of one merged directory against its anchor (scripts/sweep_recipe.py)."""
    tok = load_tokenizer(anchor_dir)
    tb = token_byte_lengths(tok)
    streams = {d: TokenStream(tokens / d / "heldout") for d in [PUBLIC, *settings.domains]}
    anchor = load_anchor(anchor_dir)[0]
    a = _bpb(lambda ids: anchor(ids).logits, streams, tb, settings)
    res = recipe_eval(load_merged(merged_dir), a, streams, tb, settings, tok)
    return {"anchor": a, **res, "baselines": {}}
