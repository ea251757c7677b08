"""`flexmoe data`: the shared tokenizer, token shards and corpus statistics."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flexmoe.cli import console, out
from flexmoe.cli.options import OverwriteOption
from flexmoe.errors import FlexmoeError

data_app = typer.Typer(help="Corpora, the shared tokenizer and token shards.", no_args_is_help=True)


@data_app.command("train-tokenizer")
def data_train_tokenizer(
    out_dir: Annotated[Path, typer.Option("--out", help="Tokenizer directory to write.")],
    corpus: Annotated[Path, typer.Option(help="FlexMix-mini root.")] = Path("data/flexmix-mini"),
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size.")] = 8192,
    overwrite: OverwriteOption = False,
) -> None:
    """Train the shared byte-level BPE tokenizer on the PUBLIC train split only."""
    from flexmoe.data.corpus import PUBLIC, iter_docs, split_path
    from flexmoe.data.tokenizer import train_tokenizer

    if not split_path(corpus, PUBLIC, "train").is_file():
        raise FlexmoeError(f"no public train split under {corpus}")
    texts = (d["text"] for d in iter_docs(corpus, PUBLIC, "train"))
    train_tokenizer(texts, out_dir, vocab_size=vocab_size, overwrite=overwrite, inputs=[corpus])
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
    # not OverwriteOption: an existing output needs --overwrite even when flexmoe wrote it
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
