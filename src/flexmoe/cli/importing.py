"""`flexmoe import`: models made elsewhere, split into an anchor and expert packages."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexmoe.cli import out
from flexmoe.cli.options import (
    ConsentExpiresOption,
    ConsentUseOption,
    OverwriteOption,
    consent_expiry,
    split_names,
)

import_app = typer.Typer(
    help="Import models made elsewhere as an anchor plus expert packages.", no_args_is_help=True
)


@import_app.command("flexolmo")
def import_flexolmo_cmd(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A local HF flex_olmo checkpoint directory (safetensors + tokenizer).",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to write: anchor/ and experts/NAME/.")
    ],
    consent_use: ConsentUseOption = None,  # required here: a checkpoint records no consent
    consent_expires: ConsentExpiresOption = None,
    owner: Annotated[str, typer.Option(help="Owner written into every package.")] = "unknown",
    licence: Annotated[str, typer.Option(help="Licence of the expert weights.")] = "unspecified",
    names: Annotated[
        list[str] | None,
        typer.Option(
            help="Names of experts 1..E-1, in checkpoint order (repeat or comma-separate; "
            "default flexolmo-1, flexolmo-2, …)."
        ),
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Split an AI2 FlexOlmo checkpoint: a dense anchor (shared weights + expert 0, the public
    expert) and one package per other expert; merging them back with --top-k K is exact."""
    from flexmoe.lifecycle.import_flexolmo import import_flexolmo, merge_command

    expires = consent_expiry(consent_expires)
    res = import_flexolmo(
        checkpoint,
        out_dir,
        split_names(consent_use) or [],
        expires=expires,
        owner=owner,
        licence=licence,
        names=split_names(names),
        overwrite=overwrite,
    )
    out.print(f"anchor → {res.anchor}  fingerprint {res.fingerprint[:16]}…")
    for name, path in zip(res.names, res.packages, strict=True):
        out.print(f"expert '{name}' → {path}")
    out.print(f"experts: {res.num_experts} (public + {len(res.packages)} packages)")
    out.print(f"top-k: {res.top_k}")
    out.print(f"merge back: {merge_command(res)}")
