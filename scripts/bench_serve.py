"""Serving throughput and latency of `flexmoe serve`, on localhost, with the official client.

    python scripts/bench_serve.py --model runs/demo/merged        # after `make demo`
    python scripts/bench_serve.py --mixed --concurrency 1 8 32    # short and long answers

Starts the server in-process on a free 127.0.0.1 port, once per batching mode (--batching:
static, the engine decodes whole batches until their longest row ends; continuous, a request
joins the running decode at the next step and leaves when it ends), then sends the same set of
greedy requests (random expert subsets, fixed seeds) at concurrency 1 (one by one), 8 and 32.
Prints generated tokens/s and p50/p99 latency per setting and per answer length, and what the
engine ran: batches (static) or admissions of newcomers and decode steps (continuous).
Bounded: --requests per setting (default 32), --max-tokens each (default 32); --mixed asks half
the requests for 8 tokens and half for 128, where a static batch makes the short wait for the
long.

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

SHORT, LONG = 8, 128  # --mixed: the two answer lengths asked for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/demo/merged"))
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--mixed", action="store_true", help=f"half {SHORT} tokens, half {LONG}")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--batching", nargs="+", choices=["static", "continuous"], default=["static", "continuous"]
    )
    ap.add_argument("--llamacpp", choices=["f32", "f16", "q8_0"], help="add a llama.cpp column")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = ap.parse_args()

    prompts = ["def fibonacci(n):", "The court ruled that", "Solve for x:", "Breaking news:"]
    lengths = [args.max_tokens] * args.requests
    if args.mixed:
        lengths = [(SHORT, LONG)[i % 2] for i in range(args.requests)]
    kinds = sorted(set(lengths))
    for k, mode in enumerate(args.batching):
        server, client, stop = _serve(args, mode)
        names = [n for n in server.experts() if n != "public"]
        rng = random.Random(0)
        reqs = [
            (prompts[i % len(prompts)], [n for n in names if rng.random() < 0.5] or None, m)
            for i, m in enumerate(lengths)
        ]

        def one(req, server=server, client=client) -> tuple[float, int]:
            prompt, sub, max_tokens = req
            t0 = time.perf_counter()
            r = client.completions.create(
                model=server.name,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"experts": {"include": sub}} if sub else None,
            )
            return time.perf_counter() - t0, r.usage.completion_tokens

        one(reqs[0])  # warm-up
        if k == 0:
            what = f"{SHORT} or {LONG}" if args.mixed else f"{args.max_tokens}"
            print(
                f"model {args.model} ({len(names) + 1} experts), {args.requests} requests × "
                f"{what} tokens, greedy, random expert subsets"
            )
            print(_header(kinds))
        for conc in args.concurrency:
            print(_setting(server, reqs, one, mode, conc, kinds))
        if args.llamacpp and k == len(args.batching) - 1:
            _vs_llamacpp(args, client, server, prompts)
        stop()


def _header(kinds: list[int]) -> str:
    head = f"{'batching':11s} {'conc':>4s} {'tokens/s':>9s}"
    for n in kinds:
        head += f" {f'p50 {n}t':>8s} {f'p99 {n}t':>8s}"
    return head + f" {'batches':>8s} {'steps':>6s}"


def _serve(args, mode: str):
    """A Server with `mode` batching behind uvicorn on a free port: (server, client, stop)."""
    import tempfile

    import uvicorn
    from openai import OpenAI

    from flexmoe.serving import Limits, Server, create_app

    state = Path(tempfile.mkdtemp(prefix=f"flexmoe-bench-serve-{mode}-"))
    limits = Limits(
        max_batch=32, queue_size=256, max_tokens=max(args.max_tokens, LONG), batching=mode
    )
    server = Server(args.model, state_dir=state, limits=limits)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(
        uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

    def stop() -> None:
        uv.should_exit = True
        thread.join(30)
        server.engine.stop()  # and let its thread end before the next server's (or exit)
        server.engine.thread.join(30)

    return server, client, stop


def _setting(server, reqs, one, mode: str, conc: int, kinds: list[int]) -> str:
    """One row: every request at concurrency `conc`; latency percentiles per answer length."""
    engine = server.engine
    b0, s0 = engine.batches, engine.steps
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        res = list(pool.map(one, reqs))
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in res)
    row = f"{mode:11s} {conc:4d} {tokens / wall:9.1f}"
    for n in kinds:
        lat = sorted(x for (x, _), (_, _, m) in zip(res, reqs, strict=True) if m == n)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        row += f" {statistics.median(lat):8.2f} {p99:8.2f}"
    steps = f"{engine.steps - s0:6d}" if mode == "continuous" else f"{'-':>6s}"
    return row + f" {engine.batches - b0:8d} {steps}"


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
