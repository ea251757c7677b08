"""Options shared by several verbs, declared once as `Annotated` aliases (the default value stays
at each command's signature), and the small parsers of option values."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexmoe.errors import FlexmoeError

# ---- where and how a model runs ----
DeviceOption = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: CUDA if any).")]
DtypeOption = Annotated[
    str | None, typer.Option(help="Weights dtype: float32 | bfloat16 (default: as stored).")
]

# ---- outputs ----
OverwriteOption = Annotated[
    bool, typer.Option(help="Replace a non-empty -o that flexmoe did not write.")
]

# ---- which experts take part ----
IncludeOption = Annotated[
    list[str] | None, typer.Option(help="Only these experts (public always kept).")
]
ExcludeOption = Annotated[list[str] | None, typer.Option(help="Opt these experts out.")]
AllowNoPublicOption = Annotated[bool, typer.Option(help="Permit excluding the public expert.")]
UseOption = Annotated[
    str | None,
    typer.Option(
        help="Intended use (commercial | research): experts whose consent forbids it are left out."
    ),
]
PreselectOption = Annotated[
    int | None,
    typer.Option(
        help="Request-level preselection: public + the M experts closest to the text "
        "(0 = token routing alone; default: the merged model's stored setting)."
    ),
]
StateOption = Annotated[
    Path | None,
    typer.Option(
        help="The served model's state dir: its revocations apply (default: MODEL.serve/)."
    ),
]

# ---- training (anchor train, expert train, router-tune) ----
StepsOption = Annotated[int | None, typer.Option(help="Optimizer steps.")]
BatchSizeOption = Annotated[int | None, typer.Option(help="Sequences per step.")]
SeqLenOption = Annotated[int | None, typer.Option(help="Tokens per sequence.")]
LrOption = Annotated[float | None, typer.Option(help="Peak learning rate.")]
WarmupOption = Annotated[int | None, typer.Option(help="Warmup steps.")]
GradAccumOption = Annotated[int | None, typer.Option(help="Micro-batches per step.")]
Bf16Option = Annotated[bool, typer.Option(help="bf16 autocast.")]
CkptEveryOption = Annotated[int | None, typer.Option(help="Checkpoint every N steps.")]
ResumeOption = Annotated[bool, typer.Option(help="Continue from the last checkpoint.")]
RestartOption = Annotated[
    bool, typer.Option(help="Discard checkpoints of an earlier run and start at step 0.")
]
StopAfterOption = Annotated[
    int | None, typer.Option(hidden=True, help="Exit after this step (tests a kill).")
]


def split_names(items: list[str] | None) -> list[str] | None:
    """Repeated and/or comma-separated option values → a flat list (None if not given)."""
    if not items:
        return None
    return [x.strip() for item in items for x in item.split(",") if x.strip()]


def check_use(use: str | None) -> None:
    """Refuse a --use that is not a known intended use."""
    from flexmoe.store.package import USES

    if use is not None and use not in USES:
        raise FlexmoeError(f"--use must be one of {', '.join(USES)}")
