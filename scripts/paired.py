"""Paired held-out BPB differences between any two rows of a committed results.json (the report
prints the comparisons its claims need; this prints any other pair, from the same scored windows
and the same bootstrap).

python scripts/paired.py results/smollm2/results.json "FlexOlmo merged" "BTM (top-2 ensemble)"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flexmoe.evaluation.intervals import paired_diff, paired_mean_diff


def fmt(d: dict) -> str:
    return f"{100 * d['rel']:+.1f}% [{100 * d['rel_lo']:+.1f}%, {100 * d['rel_hi']:+.1f}%]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="a report's results.json (with 'windows')")
    ap.add_argument("a", help="row label (A in A − B)")
    ap.add_argument("b", help="row label (B)")
    args = ap.parse_args()
    windows = json.loads(args.results.read_text())["windows"]
    for label in (args.a, args.b):
        if label not in windows:
            ap.error(f"no row {label!r}; rows: {', '.join(sorted(windows))}")
    a, b = windows[args.a], windows[args.b]
    shared = [d for d in a if d in b]
    if not shared:
        ap.error("the two rows share no scored domain")
    print(f"{args.a} − {args.b}, relative to {args.b} (paired over windows, 95% interval):")
    for d in shared:
        print(f"  {d}: {fmt(paired_diff(a[d], b[d]))}")
    if len(shared) > 1:
        mean = paired_mean_diff({d: a[d] for d in shared}, {d: b[d] for d in shared})
        print(f"  mean over {', '.join(shared)}: {fmt(mean)}")


if __name__ == "__main__":
    main()
