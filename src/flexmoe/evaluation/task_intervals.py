"""95% intervals for the downstream-task table (pure numpy; no torch).

Every model answers the same documents (`flexmoe eval tasks --limit N` takes the first N of each
task), so comparisons are PAIRED: one bootstrap draw resamples the same documents for both models.
Multiple choice: the difference of acc_norm (higher is better) per task, and of its average over
the multiple-choice tasks (documents resampled within each task). Gold-answer tasks: bits per byte
of the gold answer is the ratio Σ nll / Σ bytes over documents, the held-out BPB's estimator, so
`intervals.paired_diff` applies with documents as the resampled unit; its average over the
gold-answer tasks likewise. A single model's accuracy gets its Wilson interval.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from flexmoe.evaluation import intervals as iv

METRIC = "acc_norm"  # the multiple-choice metric the table shows
MC_AVG, BPB_AVG = "MC average", "gold BPB average"
METHOD = (
    "multiple choice: acc_norm, Wilson interval per model; gold answers: bits per byte, "
    "percentile bootstrap over documents; comparisons resample the same documents for both "
    "models (paired), averages resample documents within each task"
)


def _kind(task: Mapping) -> str | None:
    per = task.get("per_doc") or {}
    if METRIC in per:
        return "mc"
    if "loglikelihood" in per:
        return "bpb"
    return None


def _windows(task: Mapping) -> np.ndarray:
    """Gold-answer documents as held-out 'windows': [nll in nats, bytes]."""
    per = task["per_doc"]
    return np.stack([-np.asarray(per["loglikelihood"]), np.asarray(per["bytes"])], axis=1)


def _acc(task: Mapping) -> np.ndarray:
    return np.asarray(task["per_doc"][METRIC], dtype=np.float64)


def _boot_acc_mean(pairs: list[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int):
    """(n_boot, 2) bootstrap of the mean over tasks of each model's accuracy, documents
    resampled within each task, the same draw for both models."""
    rng = np.random.default_rng(seed)
    total = np.zeros((n_boot, 2))
    for a, b in pairs:
        idx = rng.integers(0, len(a), size=(n_boot, len(a)))
        total += np.stack([a[idx].mean(1), b[idx].mean(1)], axis=1)
    return total / len(pairs)


def _acc_diff(pairs, n_boot: int, seed: int, level: float) -> dict:
    """A − B of mean accuracy (higher is better): "holds" when the interval is above 0."""
    boot = _boot_acc_mean(pairs, n_boot, seed)
    d = boot[:, 0] - boot[:, 1]
    lo, hi = iv._pct(d, level)
    point = float(np.mean([a.mean() - b.mean() for a, b in pairs]))
    return {"diff": point, "lo": lo, "hi": hi, "verdict": iv.verdict(-hi, -lo)}


def _compare(a: Mapping, b: Mapping, n_boot: int, seed: int, level: float) -> dict:
    """{task | MC_AVG | BPB_AVG: paired diff of A − B (+ verdict)} on the tasks both have
    per-document results for."""
    out: dict[str, dict] = {}
    mc, bpb = [], {}
    for t in a:
        if t not in b or _kind(a[t]) != _kind(b[t]) or _kind(a[t]) is None:
            continue
        if _kind(a[t]) == "mc":
            x, y = _acc(a[t]), _acc(b[t])
            if len(x) != len(y):
                raise ValueError(f"{t}: a paired comparison needs the same documents")
            mc.append((x, y))
            out[t] = _acc_diff([(x, y)], n_boot, seed, level)
        else:
            bpb[t] = (_windows(a[t]), _windows(b[t]))
            r = iv.paired_diff(*bpb[t], n_boot, seed, level)
            out[t] = r | {"verdict": iv.verdict(r["lo"], r["hi"])}
    if mc:
        out[MC_AVG] = _acc_diff(mc, n_boot, seed, level)
    if bpb:
        a_w, b_w = {t: w[0] for t, w in bpb.items()}, {t: w[1] for t, w in bpb.items()}
        r = iv.paired_mean_diff(a_w, b_w, n_boot, seed, level)
        out[BPB_AVG] = r | {"verdict": iv.verdict(r["lo"], r["hi"])}
    return out


def averages(row: Mapping) -> dict[str, float]:
    """The row's MC_AVG (mean acc_norm) and BPB_AVG (mean gold-answer BPB), where it has them."""
    mc = [row[t][METRIC] for t in row if _kind(row[t]) == "mc"]
    bpb = [row[t]["bits_per_byte"] for t in row if _kind(row[t]) == "bpb"]
    out = {}
    if mc:
        out[MC_AVG] = float(np.mean(mc))
    if bpb:
        out[BPB_AVG] = float(np.mean(bpb))
    return out


def task_intervals(
    results: Mapping[str, Mapping[str, Mapping]],
    n_boot: int = iv.N_BOOT,
    seed: int = 0,
    level: float = iv.LEVEL,
) -> dict:
    """From {model label: run_tasks(..., per_doc=True)}: {"method", "level", "n_boot", "seed",
    "averages": {model: averages(row)}, "merged_vs": {baseline: _compare(merged, baseline)},
    "optout": {expert: _compare(merged without expert, merged)}}. Rows without per-document
    results get no comparison."""
    kw = dict(n_boot=n_boot, seed=seed, level=level)
    out = {
        "method": METHOD,
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
        "averages": {m: averages(r) for m, r in results.items()},
        "merged_vs": {},
        "optout": {},
    }
    merged = results.get(iv.MERGED)
    if merged is None:
        return out
    for label, row in results.items():
        if label.startswith("merged without "):
            out["optout"][label[len("merged without ") :]] = _compare(row, merged, **kw)
        elif label != iv.MERGED:
            out["merged_vs"][label] = _compare(merged, row, **kw)
    return out
