"""95% intervals for the numbers a demo report compares (pure numpy; no torch).

Held-out BPB is a ratio estimator, Σ nll / ln 2 / Σ bytes, over the scored windows of a domain's
held-out stream (flexmoe.inference.bpb.evaluate_bpb returns one [nll_nats, bytes] pair per
window). The held-out documents are joined into one token stream and, at demo scale, a domain
has few of them, so the resampling unit is the scored WINDOW (non-overlapping, spread evenly over
the stream), not the document: a percentile bootstrap over windows. Windows cut from one long
document are not independent, so the intervals are, if anything, too narrow; with fewer than
about 20 windows per domain the percentile bootstrap under-covers as well (see `FEW_WINDOWS`).

Every model is scored on the same windows, so comparisons are PAIRED: one bootstrap draw
resamples the same window indices for both models and the interval is that of the difference.
Everything is deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
FEW_WINDOWS = 20  # below this many windows per domain a percentile bootstrap under-covers
LN2 = math.log(2)
_CHUNK = 1 << 20  # bootstrap draws × windows resampled at once (bounded memory)

HOLDS, FAILS, TIE = "holds", "does not hold", "not distinguishable at this budget"

METHOD = (
    "percentile bootstrap over the scored held-out windows (documents are joined into one "
    "stream and few per domain, so windows are resampled, not documents); comparisons resample "
    "the same windows for both models (paired)"
)


def _arr(windows) -> np.ndarray:
    a = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
    if len(a) == 0:
        raise ValueError("no scored windows")
    if a[:, 1].sum() <= 0:
        raise ValueError("windows cover no bytes")
    return a


def bpb_of(windows) -> float:
    """The BPB the windows add up to: Σ nll / ln 2 / Σ bytes."""
    a = _arr(windows)
    return float(a[:, 0].sum() / LN2 / a[:, 1].sum())


def _draws(rng: np.random.Generator, n: int, n_boot: int):
    """Bootstrap index arrays (chunk, n), n_boot rows in all, in chunks of bounded size."""
    step = max(1, _CHUNK // max(n, 1))
    for i in range(0, n_boot, step):
        yield rng.integers(0, n, size=(min(step, n_boot - i), n))


def _boot_bpb(arrs: Sequence[np.ndarray], rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """(n_boot, len(arrs)) bootstrap BPBs of several models scored on the same windows: each draw
    resamples the same window indices for all of them."""
    n = len(arrs[0])
    out = []
    for idx in _draws(rng, n, n_boot):
        out.append(np.stack([a[idx, 0].sum(1) / LN2 / a[idx, 1].sum(1) for a in arrs], axis=1))
    return np.concatenate(out)


def _pct(x: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(x, [a, 1 - a])
    return float(lo), float(hi)


def _paired(a_windows, b_windows) -> tuple[np.ndarray, np.ndarray]:
    a, b = _arr(a_windows), _arr(b_windows)
    if a.shape != b.shape or not np.array_equal(a[:, 1], b[:, 1]):
        raise ValueError("a paired comparison needs both models scored on the same windows")
    return a, b


def bpb_ci(
    windows, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile-bootstrap interval of a domain's BPB (the ratio Σ nll / Σ bytes), resampling
    the scored windows with replacement (windows, not documents: see the module docstring)."""
    rng = np.random.default_rng(seed)
    return _pct(_boot_bpb([_arr(windows)], rng, n_boot)[:, 0], level)


def _diff(boot: np.ndarray, point_a: float, point_b: float, level: float) -> dict:
    d = boot[:, 0] - boot[:, 1]
    rel = d / boot[:, 1]
    lo, hi = _pct(d, level)
    rlo, rhi = _pct(rel, level)
    return {
        "diff": point_a - point_b,
        "rel": (point_a - point_b) / point_b,
        "lo": lo,
        "hi": hi,
        "rel_lo": rlo,
        "rel_hi": rhi,
    }


def paired_diff(
    a_windows, b_windows, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> dict:
    """A − B in BPB on one domain, both scored on the same windows: {"diff": bpb_a − bpb_b,
    "rel": diff / bpb_b, "lo", "hi" (interval of diff), "rel_lo", "rel_hi" (of rel)}, each
    bootstrap draw resampling the SAME window indices for both models."""
    a, b = _paired(a_windows, b_windows)
    boot = _boot_bpb([a, b], np.random.default_rng(seed), n_boot)
    return _diff(boot, bpb_of(a), bpb_of(b), level)


def _boot_mean(
    by_domain: Sequence[Sequence[np.ndarray]], n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """by_domain: per domain, the models' windows → (bootstrap (n_boot, models) of the mean over
    domains of per-domain BPB, point (models,)). Windows are resampled within each domain, the
    same draw for every model."""
    rng = np.random.default_rng(seed)
    boot = sum(_boot_bpb(list(arrs), rng, n_boot) for arrs in by_domain) / len(by_domain)
    point = np.mean([[bpb_of(a) for a in arrs] for arrs in by_domain], axis=0)
    return boot, point


def mean_ci(
    windows_by_domain: Mapping[str, object],
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Interval of the mean over domains of per-domain BPB (the report's "mean" column):
    windows resampled within each domain, jointly, then the per-domain BPBs averaged."""
    if not windows_by_domain:
        raise ValueError("no domains")
    boot, _ = _boot_mean([[_arr(w)] for w in windows_by_domain.values()], n_boot, seed)
    return _pct(boot[:, 0], level)


def paired_mean_diff(
    a_by_domain: Mapping[str, object],
    b_by_domain: Mapping[str, object],
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> dict:
    """paired_diff of the mean over domains (both models need the same domains): the same
    windows resampled for both models within each domain."""
    if set(a_by_domain) != set(b_by_domain) or not a_by_domain:
        raise ValueError("a paired mean needs both models measured on the same domains")
    pairs = [_paired(a_by_domain[d], b_by_domain[d]) for d in a_by_domain]
    boot, point = _boot_mean(pairs, n_boot, seed)
    return _diff(boot, float(point[0]), float(point[1]), level)


def verdict(lo: float, hi: float) -> str:
    """ "A better than B" from the interval of A − B when lower is better."""
    if hi < 0:
        return HOLDS
    if lo > 0:
        return FAILS
    return TIE


def wilson(k: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (task accuracies)."""
    if n <= 0:
        raise ValueError("wilson needs n > 0")
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if k <= 0 else max(0.0, mid - half)  # exact bounds at 0 and n, not ±1e-17
    hi = 1.0 if k >= n else min(1.0, mid + half)
    return lo, hi


# ---------------------------------------------------------------------------------------------
# the demo report's intervals, from results["windows"]

MERGED = "FlexOlmo merged"
ANCHOR = "anchor (public only)"
CONTROL = "control: anchor continued on public"
CONTROL_MERGED = "FlexOlmo merged, public expert = control"
PAPER = "FlexOlmo merged (paper recipe)"
UNRESTRICTED = "ablation: unrestricted MoE (joint data)"
UNRESTRICTED_ALL = "ablation: unrestricted MoE (joint data + public)"
BASELINES = (
    ANCHOR,
    "model soup (uniform)",
    "model soup (weighted)",
    "BTM (top-2 ensemble)",
    CONTROL,
    UNRESTRICTED,
    UNRESTRICTED_ALL,
    PAPER,
)
PAIRS = ((CONTROL_MERGED, CONTROL),)  # other paired comparisons the report reads: A − B
TWO_EXPERT = "2-expert: public+"
OPTOUT = "optout: "
OPTOUT_RT = "optout (router tuning): "
VARIANT = "variant: "  # "variant: <recipe>: <variant>" (demo_eval.inference_variant rows)
TUNED = "FlexOlmo merged + router tuning"


def _measured(row_windows: Mapping[str, object] | None, domains: Sequence[str]) -> dict:
    return {d: row_windows[d] for d in domains if row_windows and row_windows.get(d)}


def _compare(a: Mapping, b: Mapping, on: Sequence[str], domains, n_boot, seed, level) -> dict:
    """{column: paired diff of A − B (+ verdict)} for each column in `on` ("mean" included)
    that both are measured on; unmeasured columns are left out."""
    out = {}
    for c in on:
        if c == "mean":
            if all(d in a and d in b for d in domains):
                r = paired_mean_diff(
                    {d: a[d] for d in domains}, {d: b[d] for d in domains}, n_boot, seed, level
                )
            else:
                continue
        elif c in a and c in b:
            r = paired_diff(a[c], b[c], n_boot, seed, level)
        else:
            continue
        out[c] = r | {"verdict": verdict(r["lo"], r["hi"])}
    return out


def demo_intervals(
    windows: Mapping[str, Mapping[str, object]],
    domains: Sequence[str],
    seq_len: int | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> dict:
    """results["intervals"] from results["windows"] ({row label: {domain: windows}}; rows
    "optout: <expert>" are the merged model with that expert excluded). Domains a row was not
    measured on (lean evaluation) have no windows and get no interval.

    → {"method", "level", "n_boot", "seed", "windows": {domain: n}, "tokens": {domain: n},
       "rows": {row: {column: [lo, hi]}},            (every row; "mean" where all measured)
       "vs_anchor": {row: {column: paired diff}},    (every row but the anchor)
       "merged_vs": {row: {column: paired diff}},    (merged − anchor, soups, BTM, 2-expert)
       "optout": {expert: {column: paired diff}},    (merged without expert − merged)
       "optout_rt": {expert: {column: paired diff}}, (the same for the router-tuned model)
       "pairs": {"A vs B": {column: paired diff}},   (PAIRS, where both were measured)
       "bias": {recipe: {column: paired diff}}}     (token routing, learned bias − b = 0)
    where a paired diff is paired_diff's dict plus "verdict" (A better than B: verdict(lo, hi)).
    """
    domains = list(domains)
    cols = [*domains, "mean"]
    meas = {label: _measured(w, domains) for label, w in windows.items()}
    any_row = max(meas.values(), key=len, default={})  # a row measured on every domain
    n_win = {d: len(_arr(w)) for d, w in any_row.items()}
    kw = dict(n_boot=n_boot, seed=seed, level=level)
    rows = {}
    for label, m in meas.items():
        r = {d: list(bpb_ci(w, **kw)) for d, w in m.items()}
        if m and all(d in m for d in domains):
            r["mean"] = list(mean_ci(m, **kw))
        rows[label] = r
    main = {k: v for k, v in meas.items() if not k.startswith((OPTOUT, OPTOUT_RT, VARIANT))}
    out = {
        "method": METHOD,
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
        "windows": n_win,
        "tokens": {d: n * seq_len for d, n in n_win.items()} if seq_len else {},
        "rows": rows,
        "vs_anchor": {},
        "merged_vs": {},
        "optout": {},
        "optout_rt": {},
        "pairs": {},
        "bias": {},
    }
    args = (domains, n_boot, seed, level)
    for k in meas:
        if k.startswith(VARIANT) and k.endswith(": token"):
            label = k[len(VARIANT) : -len(": token")]
            stock = meas.get(f"{VARIANT}{label}: stock")
            if stock:
                out["bias"][label] = _compare(meas[k], stock, cols, *args)
    for a, b in PAIRS:
        if a in main and b in main:
            out["pairs"][f"{a} vs {b}"] = _compare(main[a], main[b], cols, *args)
    if ANCHOR in main:
        out["vs_anchor"] = {
            k: _compare(m, main[ANCHOR], cols, *args) for k, m in main.items() if k != ANCHOR
        }
    if MERGED in main:
        merged = main[MERGED]
        for b in BASELINES:
            if b in main:
                out["merged_vs"][b] = _compare(merged, main[b], cols, *args)
        for k, m in main.items():
            if k.startswith(TWO_EXPERT):
                d = k[len(TWO_EXPERT) :]
                out["merged_vs"][k] = _compare(merged, m, [d, "mean"], *args)
        for k, m in meas.items():
            if k.startswith(OPTOUT):
                out["optout"][k[len(OPTOUT) :]] = _compare(m, merged, cols, *args)
    if TUNED in main:
        for k, m in meas.items():
            if k.startswith(OPTOUT_RT):
                out["optout_rt"][k[len(OPTOUT_RT) :]] = _compare(m, main[TUNED], cols, *args)
    return out
