"""The main job (`make demo`): the whole FlexOlmo lifecycle on FlexMix-mini, end to end.

anchor (imported pretrained SmolLM2-135M, or trained from scratch with its own tokenizer) → token
shards → one expert per demo domain (each owner alone) → dense experts (baselines) → merge →
evaluation against anchor, model soup and BTM → opt-out → a generation with attribution → report.
Every stage is skipped when its output exists and was built from the same spec, so a second
`make demo` only re-prints the results.

The settings are flexmoe.demo.config, the building stages flexmoe.demo.stages, the measurements
flexmoe.evaluation.demo_eval and the report's text and plots flexmoe.demo.render.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console

from flexmoe.data.corpus import PUBLIC
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.demo.config import DemoConfig
from flexmoe.demo.export import stage_seconds
from flexmoe.demo.render import print_main_table, write_report
from flexmoe.demo.stages import (
    merge_stage,
    prepare_data,
    print_stats,
    router_tune_stage,
    run_stage,
    train_ablations,
    train_models,
)
from flexmoe.demo.tasks_report import tasks_md
from flexmoe.evaluation.demo_eval import evaluate_all
from flexmoe.evaluation.tasks import DEFAULT_TASK_DIR, run_tasks
from flexmoe.lifecycle.baselines import soup
from flexmoe.store.anchor_dir import load_anchor
from flexmoe.store.fsutil import atomic_dir, sha256_file, write_json
from flexmoe.store.records import spec_hash

__all__ = ["DemoConfig", "run_demo"]  # DemoConfig: defined in flexmoe.demo.config

console = Console(stderr=True)


def tasks_stage(cfg: DemoConfig, paths: dict[str, Path], merged: Path) -> dict:
    """Downstream tasks (flexmoe eval tasks: OLMES multiple choice + gold-answer BPB) for the
    anchor, the merged model, the merged model with each expert excluded, the uniform soup and
    BTM (the ensemble through an lm-eval model, evaluation.tasks), cfg.task_limit documents per
    task."""
    root = cfg.out / "tasks"
    # (file stem, label) → (model, run_tasks options); the comparisons of the claims come first
    runs: dict[tuple[str, str], tuple[Path, dict]] = {
        ("anchor", "anchor (public only)"): (paths["anchor"], {}),
        ("merged", "FlexOlmo merged"): (merged, {}),
    }
    if cfg.baselines:
        soup_dir = root / "soup"

        def build_soup():
            members = [load_anchor(paths["anchor"])[0]]
            members += [load_anchor(paths[f"dense/{d}"])[0] for d in cfg.domains]
            with atomic_dir(soup_dir, overwrite=True) as tmp:
                soup(members).save_pretrained(tmp)
                load_tokenizer(paths["anchor"]).save_pretrained(tmp)

        run_stage(
            root / ".soup-model.json",  # not .soup.json: the soup row's marker
            {
                "members": [
                    sha256_file(paths[f"dense/{d}"] / "model.safetensors") for d in cfg.domains
                ]
            },
            build_soup,
            "tasks: the uniform model soup as a model directory",
        )
        runs[("soup", "model soup (uniform)")] = (soup_dir, {})
        dense = [str(paths[f"dense/{d}"]) for d in cfg.domains]
        runs[("btm", "BTM (top-2 ensemble)")] = (paths["anchor"], {"btm": dense})
    if cfg.task_optouts:
        runs |= {
            (f"without-{d}", f"merged without {d}"): (merged, {"exclude": [d]}) for d in cfg.domains
        }
    evaluated = spec_hash(_eval_spec(cfg)["stages"])  # redone when any model stage changes
    autocast = "bfloat16" if cfg.eval_bf16 else None  # the held-out evaluation's numerics
    results = {}
    for (stem, label), (model, kw) in runs.items():
        out = root / f"{stem}.json"
        spec = {"model": str(model), "kw": kw, "limit": cfg.task_limit, "models": evaluated}
        run_stage(
            root / f".{stem}.json",
            spec | {"autocast": autocast, "v": 2},
            lambda out=out, model=model, kw=kw: write_json(
                out,
                run_tasks(
                    model,
                    task_dir=DEFAULT_TASK_DIR,
                    limit=cfg.task_limit,
                    autocast=autocast,
                    per_doc=True,
                    **kw,
                ),
            ),
            f"tasks: {label} ({cfg.task_limit} docs per task)",
        )
        results[label] = json.loads(out.read_text())
    write_json(root / "results.json", results)
    return results


def preselect_stage(cfg: DemoConfig, paths: dict[str, Path], merged: Path) -> Path:
    """Top-1 accuracy of each way of preselecting a request's expert (MiniLM centroids, anchor
    hidden-state centroids, the merged model's routers) on held-out and hand-written prompts."""
    from flexmoe.evaluation.heldout import load_for_eval
    from flexmoe.evaluation.preselect_bench import bench_md, run_bench

    out = cfg.out / "preselect"

    def build():
        model, tok = load_for_eval(merged)
        anchor, _ = load_for_eval(paths["anchor"])
        res = run_bench(model, anchor, tok, cfg.domains, root=cfg.corpus)
        with atomic_dir(out, overwrite=True) as tmp:
            write_json(tmp / "bench.json", res)
            (tmp / "bench.md").write_text(bench_md(res))

    spec = {"models": spec_hash(_eval_spec(cfg)["stages"]), "corpus": str(cfg.corpus), "v": 1}
    run_stage(cfg.out / ".preselect.json", spec, build, "preselection benchmark")
    return out


def run_demo(cfg: DemoConfig, until: str | None = None) -> dict:
    """`until="models"`: stop once every model is trained and merged (a part of a long run that
    must end inside a working session; the next call reuses them and evaluates)."""
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
    if until == "models":
        console.print(f"models ready in {time.perf_counter() - t0:.0f} s (--until models)")
        return {}
    report_dir = cfg.out / "report"
    run_stage(
        cfg.out / ".report.json",
        _eval_spec(cfg),
        lambda: write_report(evaluate(cfg, paths, recipes, tokens, extra, tuned), report_dir),
        "evaluation and report",
    )
    results = json.loads((report_dir / "results.json").read_text())
    if cfg.preselect_bench:
        bench = preselect_stage(cfg, paths, merged)
        shutil.copyfile(bench / "bench.md", report_dir / "preselect.md")
        shutil.copyfile(bench / "bench.json", report_dir / "preselect.json")
    if cfg.tasks:
        tasks = tasks_stage(cfg, paths, merged)
        write_json(report_dir / "tasks.json", {"limit": cfg.task_limit, "results": tasks})
        (report_dir / "tasks.md").write_text(tasks_md(tasks, cfg.task_limit))
    print_main_table(results)
    console.print(f"report → {report_dir / 'report.md'}   total {time.perf_counter() - t0:.0f} s")
    return results


def evaluate(cfg: DemoConfig, paths, recipes, tokens, extra, tuned) -> dict:
    """demo_eval.evaluate_all, under bf16 autocast when cfg.eval_bf16 (every model alike), with
    the run's settings recorded beside the results. Rows are kept as they are scored under
    eval-cache/<scoring settings>, keyed by the models they score (demo_eval.row_key), so an
    interrupted evaluation resumes and a larger run (a later part of `make results`) scores only
    its new models; rows of other scoring settings are removed."""
    cache = cfg.out / "eval-cache"
    scoring = {
        "tokens": json.loads((cfg.out / ".tokens.json").read_text())["spec_hash"],
        "eval_tokens": cfg.eval_tokens,
        "seq_len": cfg.seq_len,
        "bf16": cfg.eval_bf16,
        "context": cfg.preselect_context,
        "v": 1,
    }
    spec = spec_hash(scoring)[:16]
    for old in cache.iterdir() if cache.is_dir() else []:
        if old.name != spec:
            shutil.rmtree(old)
    settings = dataclasses.replace(cfg.eval_settings(), cache_dir=str(cache / spec))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.eval_bf16 else nullcontext()
    with ctx:
        results = evaluate_all(settings, paths, recipes, tokens, extra, tuned)
    results["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}
    results["curves"] = training_curves(paths)
    results["stage_seconds"] = stage_seconds(cfg.out)
    results["eval_dtype"] = "bfloat16 autocast" if cfg.eval_bf16 else "float32"
    return results


def training_curves(paths: dict[str, Path]) -> dict[str, list[list[float]]]:
    """{"<kind>/<domain>": [[tokens, loss], ...]} from the metrics.jsonl that training writes
    beside each model (<model>.train/), for the report's curves.png."""
    out = {}
    for key, path in paths.items():
        kind, _, dom = key.rpartition("/") if "/" in key else (key, "", PUBLIC)
        log = path.with_name(path.name + ".train") / "metrics.jsonl"
        if not log.is_file():
            continue
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        pts = [[r["tokens"], r["loss"]] for r in lines if "loss" in r and "tokens" in r]
        out[f"{kind}/{dom}"] = pts
    return out


def _eval_spec(cfg: DemoConfig) -> dict:
    """The evaluation is redone when any model stage or the run's settings change."""
    stages = {
        str(m.relative_to(cfg.out)): json.loads(m.read_text())["spec_hash"]
        for m in sorted(cfg.out.rglob(".*.json"))
        if m.name not in (".report.json", ".preselect.json")  # the evaluation's own and stages
        and m.relative_to(cfg.out).parts[0] != "tasks"  # after it
    }
    after = ("out", "tasks", "task_limit", "task_optouts", "preselect_bench")  # stages after it
    settings = {k: str(v) for k, v in vars(cfg).items() if k not in after}
    return {"stages": stages, "settings": settings, "context": cfg.preselect_context, "v": 3}
