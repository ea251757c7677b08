"""`flexmoe export`: models in other runtimes' formats (GGUF for llama.cpp)."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexmoe.cli import console, out
from flexmoe.cli.options import (
    AllowNoPublicOption,
    ExcludeOption,
    IncludeOption,
    OverwriteOption,
    StateOption,
    UseOption,
    check_use,
    split_names,
)

export_app = typer.Typer(
    help="Export a model for other runtimes (GGUF for llama.cpp).", no_args_is_help=True
)


@export_app.command("gguf")
def export_gguf_cmd(
    model: Annotated[
        Path,
        typer.Argument(
            help="An anchor, dense expert or merged model directory.", show_default=False
        ),
    ],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="GGUF file to write.")],
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    allow_no_public: AllowNoPublicOption = False,
    use: UseOption = None,
    state: StateOption = None,
    type_: Annotated[
        str, typer.Option("--type", help="Weight type: f32 | f16 | q8_0 (norms and routers f32).")
    ] = "f16",
    overwrite: OverwriteOption = False,
) -> None:
    """Write MODEL as one GGUF file for llama.cpp: only the allowed experts are in it (llama.cpp
    has no per-request expert mask, so opt-out happens here), routed by token without the router
    bias or preselection. Llama/SmolLM/Mistral and Qwen3 rows; FlexOlmo is refused."""
    from flexmoe.lifecycle.gguf_export import export_gguf

    check_use(use)
    res = export_gguf(
        model,
        out_file,
        include=split_names(include),
        exclude=split_names(exclude),
        allow_no_public=allow_no_public,
        use=use,
        qtype=type_,
        state=state,
        overwrite=overwrite,
    )
    for name, reason in res.dropped:
        console.print(f"expert '{name}' left out: {reason}", style="yellow")
    if res.max_bias > 0:
        console.print(
            f"note: router bias dropped (largest |b| {res.max_bias:.3g}); llama.cpp routes as "
            "the stock checkpoint does",
            style="yellow",
        )
    what = f"{len(res.experts)} experts, top-{res.top_k}" if res.experts else "dense"
    out.print(
        f"{res.architecture} ({what}, {type_}, pre-tokenizer {res.tokenizer_pre}) → {res.path}"
    )
    if res.experts:
        out.print("experts: " + ", ".join(res.experts))
    out.print(f"size: {res.bytes:,} bytes")
