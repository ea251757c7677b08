"""Serving throughput and latency of `flexmoe serve`, on localhost, with the official client.

    python scripts/bench_serve.py --model runs/demo/merged        # after `make demo`

Starts the server in-process on a free 127.0.0.1 port, then sends the same set of greedy
requests (random expert subsets, fixed seeds) one by one and at concurrency 1, 8 and 32. Prints
generated tokens/s and p50/p99 latency per setting, and how many batches the engine ran.
Bounded: --requests per setting (default 32), --max-tokens each (default 32).

--llamacpp TYPE adds llama.cpp beside flexmoe's engine (one by one, the whole model, no expert
subsets: llama.cpp has no per-request mask, a subset is its own export): the model exported with
`flexmoe export gguf --type TYPE` and served by llama.cpp in this process (xllamacpp).
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/demo/merged"))
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--llamacpp", choices=["f32", "f16", "q8_0"], help="add a llama.cpp column")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = ap.parse_args()

    import tempfile

    import uvicorn
    from openai import OpenAI

    from flexmoe.serving import Limits, Server, create_app

    state = Path(tempfile.mkdtemp(prefix="flexmoe-bench-serve-"))
    server = Server(args.model, state_dir=state, limits=Limits(max_batch=32, queue_size=256))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(
        uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    names = [n for n in server.experts() if n != "public"]
    rng = random.Random(0)
    prompts = ["def fibonacci(n):", "The court ruled that", "Solve for x:", "Breaking news:"]
    reqs = [
        (prompts[i % len(prompts)], [n for n in names if rng.random() < 0.5] or None)
        for i in range(args.requests)
    ]

    def one(req) -> tuple[float, int]:
        prompt, sub = req
        t0 = time.perf_counter()
        r = client.completions.create(
            model=server.name,
            prompt=prompt,
            max_tokens=args.max_tokens,
            temperature=0,
            extra_body={"experts": {"include": sub}} if sub else None,
        )
        return time.perf_counter() - t0, r.usage.completion_tokens

    one(reqs[0])  # warm-up
    print(
        f"model {args.model} ({len(names) + 1} experts), {args.requests} requests × "
        f"{args.max_tokens} tokens, greedy, random expert subsets"
    )
    print(f"{'setting':16s} {'tokens/s':>9s} {'p50 s':>7s} {'p99 s':>7s} {'batches':>8s}")
    for label, conc in [("one by one", 0), *[(f"concurrency {c}", c) for c in args.concurrency]]:
        b0 = server.engine.batches
        t0 = time.perf_counter()
        if conc == 0:
            res = [one(r) for r in reqs]
        else:
            with ThreadPoolExecutor(conc) as pool:
                res = list(pool.map(one, reqs))
        wall = time.perf_counter() - t0
        lat = sorted(x for x, _ in res)
        tokens = sum(n for _, n in res)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        print(
            f"{label:16s} {tokens / wall:9.1f} {statistics.median(lat):7.2f} {p99:7.2f} "
            f"{server.engine.batches - b0:8d}"
        )
    if args.llamacpp:
        _vs_llamacpp(args, client, server, prompts)
    uv.should_exit = True


def _vs_llamacpp(args, client, server, prompts) -> None:
    """Generated tokens/s, one request at a time, whole model: flexmoe's server vs llama.cpp."""
    import tempfile

    from flexmoe.evaluation.llamacpp import LlamaCpp
    from flexmoe.lifecycle.gguf_export import export_gguf

    gguf = Path(tempfile.mkdtemp(prefix="flexmoe-bench-gguf-")) / f"model-{args.llamacpp}.gguf"
    res = export_gguf(args.model, gguf, qtype=args.llamacpp)
    cpp = LlamaCpp(gguf, threads=args.threads, n_ctx=1024)
    tok = server.tok
    reqs = [prompts[i % len(prompts)] for i in range(args.requests)]

    def flexmoe_one(p: str) -> int:
        r = client.completions.create(
            model=server.name, prompt=p, max_tokens=args.max_tokens, temperature=0
        )
        return r.usage.completion_tokens

    def cpp_one(p: str) -> int:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        return len(cpp.greedy(ids, args.max_tokens))

    print(
        f"\nwhole model, one by one, {args.requests} × {args.max_tokens} tokens "
        f"(llama.cpp: {args.llamacpp}, {len(res.experts)} experts top-{res.top_k}, "
        f"{args.threads} threads)"
    )
    print(f"{'engine':16s} {'tokens/s':>9s}")
    for label, fn in (("flexmoe serve", flexmoe_one), (f"llama.cpp {args.llamacpp}", cpp_one)):
        fn(reqs[0])  # warm-up
        t0 = time.perf_counter()
        tokens = sum(fn(p) for p in reqs)
        print(f"{label:16s} {tokens / (time.perf_counter() - t0):9.1f}")


if __name__ == "__main__":
    main()
