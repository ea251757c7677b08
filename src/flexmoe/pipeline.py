"""The main job (`make demo`): the whole FlexOlmo lifecycle on FlexMix-mini, end to end.

tokenizer → token shards → anchor → one expert per demo domain (each owner alone) → dense
experts (baselines) → merge → evaluation against anchor, model soup and BTM → opt-out → a
generation with attribution → report. Every stage is skipped when its output exists and was built
from the same spec, so a second `make demo` only re-prints the results.
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
from flexmoe.fsutil import sha256_file, write_json
from flexmoe.records import spec_hash

console = Console(stderr=True)


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    corpus: Path = DEFAULT_ROOT
    domains: list[str] = field(default_factory=lambda: ["code", "math", "news", "social"])
    vocab_size: int = 8192
    anchor_preset: str = "demo"
    anchor_steps: int | None = None
    expert_steps: int = 120
    expert_lr: float = 2e-3
    dense_lr: float = 5e-4
    batch_size: int = 16
    seq_len: int = 256
    router_docs: int = 200
    eval_tokens: int = 16384
    seed: int = 0
    baselines: bool = True
    prompt: str = "def fibonacci(n):"

    @classmethod
    def full(cls, out: Path = Path("runs/demo-full")) -> DemoConfig:
        from flexmoe.data.corpus import CLOSED_DOMAINS

        return cls(
            out=out,
            domains=list(CLOSED_DOMAINS),
            expert_steps=400,
            router_docs=1000,
            eval_tokens=65536,
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


def prepare_data(cfg: DemoConfig) -> tuple[Path, Path]:
    """Tokenizer (public train only) and token shards for every domain and split."""
    from flexmoe.data.corpus import DOMAINS, iter_docs
    from flexmoe.data.shards import tokenize_to_shards
    from flexmoe.data.tokenizer import train_tokenizer

    tok_dir, tokens = cfg.out / "tokenizer", cfg.out / "tokens"
    corpus_sha = sha256_file(cfg.corpus / "manifest.json")
    _stage(
        cfg.out / ".tokenizer.json",
        {"corpus": corpus_sha, "vocab": cfg.vocab_size},
        lambda: train_tokenizer(
            (d["text"] for d in iter_docs(cfg.corpus, PUBLIC, "train")), tok_dir, cfg.vocab_size
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

    _stage(
        cfg.out / ".tokens.json",
        {"corpus": corpus_sha, "tokenizer": tok_sha},
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
    from flexmoe.anchor import train_anchor
    from flexmoe.expert import train_expert

    paths = {"anchor": cfg.out / "anchor"}
    tok_sha = sha256_file(tok_dir / "tokenizer.json")
    a_spec = {
        "preset": cfg.anchor_preset,
        "steps": cfg.anchor_steps,
        "tokenizer": tok_sha,
        "seed": cfg.seed,
        "router_docs": cfg.router_docs,
        "v": 1,
    }
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
        ),
        f"anchor: dense OLMo-2, preset '{cfg.anchor_preset}', public data",
    )
    anchor_fp = json.loads((paths["anchor"] / "flexmoe_anchor.json").read_text())["fingerprint"]
    common = dict(
        steps=cfg.expert_steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
        eval_tokens=cfg.eval_tokens,
    )
    for d in cfg.domains:
        paths[f"expert/{d}"] = cfg.out / "experts" / d
        spec = {
            "anchor": anchor_fp,
            "domain": d,
            "lr": cfg.expert_lr,
            **common,
            "router_docs": cfg.router_docs,
            "v": 1,
        }
        _stage(
            cfg.out / "experts" / f".{d}.json",
            spec,
            lambda d=d: train_expert(
                paths["anchor"],
                tokens / d / "train",
                paths[f"expert/{d}"],
                d,
                heldout=tokens / d / "heldout",
                domain=d,
                owner=f"{d}-owner",
                licence="see DATA_CARD",
                router_docs=cfg.router_docs,
                lr=cfg.expert_lr,
                **common,
            ),
            f"expert '{d}': trained alone on {d} against the frozen anchor",
        )
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
                ),
                f"dense expert '{d}' (baseline): anchor continued on {d}, same data budget",
            )
    return paths


def run_demo(cfg: DemoConfig) -> dict:
    from flexmoe.merge import merge
    from flexmoe.report import evaluate_all, print_main_table, write_report

    t0 = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    tok_dir, tokens = prepare_data(cfg)
    print_stats(cfg, tokens)
    paths = train_models(cfg, tok_dir, tokens)
    merged = cfg.out / "merged"
    pkgs = [paths[f"expert/{d}"] for d in cfg.domains]
    m_spec = {"packages": [sha256_file(p / "manifest.json") for p in pkgs], "v": 1}
    _stage(
        cfg.out / ".merged.json",
        m_spec,
        lambda: merge(paths["anchor"], pkgs, merged, log=console.print),
        f"merge: public + {len(pkgs)} experts, no joint training",
    )
    results = evaluate_all(cfg, paths, merged, tokens)
    report_dir = write_report(results, cfg.out / "report")
    print_main_table(results)
    console.print(f"report → {report_dir / 'report.md'}   total {time.perf_counter() - t0:.0f} s")
    return results
