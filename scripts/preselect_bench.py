"""Preselection benchmark (flexmoe.evaluation.preselect_bench): top-1 accuracy of each method of
picking a request's expert, per domain, on held-out and hand-written prompts.

python scripts/preselect_bench.py --run runs/demo --out results/preselect
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a demo run directory (anchor, merged)")
    p.add_argument("--out", type=Path, required=True, help="where bench.md / bench.json go")
    p.add_argument("--n", type=int, default=50, help="held-out documents per domain")
    p.add_argument("--centroid-docs", type=int, default=64, help="training docs per centroid")
    args = p.parse_args()

    from flexmoe.evaluation.heldout import load_for_eval
    from flexmoe.evaluation.preselect_bench import bench_md, run_bench
    from flexmoe.selection import expert_names
    from flexmoe.store.fsutil import atomic_file, write_json

    t0 = time.perf_counter()
    merged, tok = load_for_eval(args.run / "merged")
    anchor, _ = load_for_eval(args.run / "anchor")
    domains = [n for n in expert_names(merged) if n != "public"]
    res = run_bench(merged, anchor, tok, domains, args.n, args.centroid_docs)
    res["run"], res["seconds"] = str(args.run), time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bench.json", res)
    md = bench_md(res) + f"\n`python scripts/preselect_bench.py --run {args.run} --out {args.out}`"
    md += f" ({res['seconds']:.0f} s)\n"
    with atomic_file(args.out / "bench.md") as f:
        f.write(md)
    print(md)
    print(json.dumps(res["confusion"]["64 tokens"], indent=1))


if __name__ == "__main__":
    main()
