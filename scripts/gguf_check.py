"""llama.cpp vs flexmoe on a GGUF export of a real model: greedy continuations and next-token
log-probabilities, per weight type, with and without an excluded expert.

    python scripts/gguf_check.py runs/demo/merged --exclude code      # after `make demo`

For each --types entry the model (or the allowed subset) is exported with `flexmoe export gguf`
into --dir, loaded by llama.cpp (xllamacpp, `pip install 'flexmoe[llamacpp]'`) and compared with
flexmoe's model routed as the file is (token routing over the exported experts, no router bias):
- greedy: how many of --tokens greedy tokens agree before the first difference, per prompt
  (tokens that are part of a character are banned on both sides; see partial_tokens);
- max |Δ log p| over llama.cpp's 8 most likely first tokens, per prompt;
in llama.cpp's f32 mode (f32 KV cache, flash attention off) and with its defaults (f16 KV cache).
Prints a markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPTS = [
    "def fibonacci(n):",
    "import numpy as np\n\ndef mean_squared_error(",
    "Solve for x: 3x + 7 = 22.",
    "The city council voted on Tuesday to",
    "lol my cat just knocked over",
    "Photosynthesis is the process by which",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--exclude", nargs="*", default=[])
    ap.add_argument("--types", default="f32,f16,q8_0")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("runs/gguf"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.evaluation.llamacpp import AsExported, LlamaCpp, partial_tokens
    from flexmoe.lifecycle.gguf_export import export_gguf
    from flexmoe.store.merged import load_model

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    banned = partial_tokens(tok)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    model = load_model(args.model).float().eval()
    with AsExported(model, exclude=args.exclude or None) as fx:
        ref_greedy = [fx.greedy(i, args.tokens, banned) for i in ids]
        ref_lp = [fx.next_logprobs(i) for i in ids]

    rows = []
    tag = "-no-" + "-".join(args.exclude) if args.exclude else ""
    for t in args.types.split(","):
        path = args.dir / f"{args.model.name}{tag}-{t}.gguf"
        t0 = time.perf_counter()
        res = export_gguf(args.model, path, exclude=args.exclude or None, qtype=t)
        export_s = time.perf_counter() - t0
        for exact in (True, False):
            cpp = LlamaCpp(path, threads=args.threads, exact=exact, banned=banned)
            agree, worst = [], []
            for i, g, lp in zip(ids, ref_greedy, ref_lp, strict=True):
                got = cpp.greedy(i, args.tokens)
                agree.append(
                    next(
                        (k for k, (a, b) in enumerate(zip(got, g, strict=False)) if a != b), len(g)
                    )
                )
                top = cpp.next_logprobs(i, 8)
                worst.append(max(abs(v - float(lp[k])) for k, v in top.items()))
            del cpp
            rows.append(
                {
                    "type": t,
                    "llama.cpp": "f32 (exact)" if exact else "defaults",
                    "experts": res.experts,
                    "bytes": res.bytes,
                    "export_s": round(export_s, 1),
                    "greedy_agree": agree,
                    "max_abs_dlogp": [round(w, 5) for w in worst],
                }
            )

    print(f"model {args.model}, experts in the file: {', '.join(rows[0]['experts'])}")
    print(f"{len(PROMPTS)} prompts, {args.tokens} greedy tokens each\n")
    print(
        "| type | llama.cpp | size (MB) | prompts identical | greedy tokens agreeing "
        "| max abs Δ log p |"
    )
    print("|---|---|---:|---:|---|---:|")
    for r in rows:
        full = sum(a == args.tokens for a in r["greedy_agree"])
        print(
            f"| {r['type']} | {r['llama.cpp']} | {r['bytes'] / 1e6:,.0f} | {full}/{len(PROMPTS)} "
            f"| {' '.join(map(str, r['greedy_agree']))} | {max(r['max_abs_dlogp']):.2e} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"prompts": PROMPTS, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
