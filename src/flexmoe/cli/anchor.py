"""`flexmoe anchor`: train the public dense anchor, or import a pretrained one."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexmoe.cli import console, out
from flexmoe.cli.options import (
    Bf16Option,
    CkptEveryOption,
    DeviceOption,
    DtypeOption,
    GradAccumOption,
    LrOption,
    OverwriteOption,
    RestartOption,
    ResumeOption,
    SeqLenOption,
    StopAfterOption,
    WarmupOption,
)
from flexmoe.errors import FlexmoeError

anchor_app = typer.Typer(
    help="The public dense anchor (trained OLMo-2, or an imported pretrained model).",
    no_args_is_help=True,
)


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
    seq_len: SeqLenOption = None,
    lr: LrOption = None,
    warmup: WarmupOption = None,
    grad_accum: GradAccumOption = None,
    bf16: Bf16Option = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    seed: Annotated[int, typer.Option(help="Seed for init and data order.")] = 0,
    eval_every: Annotated[int | None, typer.Option(help="Held-out eval every N steps.")] = None,
    ckpt_every: CkptEveryOption = None,
    resume: ResumeOption = False,
    reuse: Annotated[bool, typer.Option(help="Skip if OUT was built from the same spec.")] = False,
    router_docs: Annotated[int, typer.Option(help="Public documents to embed.")] = 1000,
    overwrite: OverwriteOption = False,
    restart: RestartOption = False,
    stop_after: StopAfterOption = None,
) -> None:
    """Pretrain a dense OLMo-2 anchor on public data (runs under torchrun for FSDP2)."""
    from flexmoe.lifecycle.anchor import train_anchor

    rec = train_anchor(
        data,
        out_dir,
        tokenizer,
        preset=preset,
        evals=_parse_named(eval_data, "--eval"),
        resume=resume,
        reuse=reuse,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        warmup=warmup,
        grad_accum=grad_accum,
        bf16=bf16 or None,
        device=device,
        dtype=dtype,
        seed=seed,
        eval_every=eval_every,
        ckpt_every=ckpt_every,
        router_docs=router_docs,
        overwrite=overwrite,
        restart=restart,
        stop_after=stop_after,
    )
    if "fingerprint" in rec:
        out.print(f"anchor → {out_dir}  fingerprint {rec['fingerprint'][:16]}…")


@anchor_app.command("import")
def anchor_import(
    hf_dir: Annotated[
        Path | None,
        typer.Argument(
            help="A local HF dense checkpoint directory (safetensors).", show_default=False
        ),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Anchor directory to write.")] = None,
    public: Annotated[
        Path,
        typer.Option(
            help="Public data for the public router embedding: token shards made with the "
            "model's tokenizer, or raw .jsonl/.txt/.parquet (tokenized with it)."
        ),
    ] = None,
    gguf: Annotated[
        Path | None, typer.Option(help="Import a GGUF file instead (dequantised to float32).")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer dir, if the model has none of its own.")
    ] = None,
    router_docs: Annotated[int, typer.Option(help="Public documents to embed.")] = 1000,
    overwrite: OverwriteOption = False,
) -> None:
    """Import a pretrained dense model (OLMo-2, Llama/SmolLM/Mistral, Qwen3; HF dir or --gguf)."""
    from flexmoe.lifecycle.anchor import import_anchor

    if out_dir is None or public is None:
        raise FlexmoeError(f"missing option {'--out' if out_dir is None else '--public'}")
    rec = import_anchor(
        hf_dir,
        out_dir,
        public,
        tokenizer,
        router_docs=router_docs,
        overwrite=overwrite,
        gguf=gguf,
    )
    if rec.get("config_keys_dropped"):
        console.print(
            "note: left out of the anchor's config (flexmoe never loads remote code): "
            + ", ".join(rec["config_keys_dropped"]),
            style="yellow",
        )
    out.print(f"anchor ({rec['architecture']}) → {out_dir}  fingerprint {rec['fingerprint'][:16]}…")
