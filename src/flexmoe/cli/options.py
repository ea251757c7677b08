"""Options shared by several verbs, declared once as `Annotated` aliases (the default value stays
at each command's signature); the range of every numeric option, declared once by its name
(`RANGES`) and checked before a command does any work (`validated`, applied to every verb by
`flexmoe.cli`); and the small parsers of option values."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

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

# ---- an owner's consent, as written into expert packages ----
ConsentUseOption = Annotated[
    list[str] | None,
    typer.Option("--consent-use", help="Allowed use: research | commercial (repeatable)."),
]
ConsentExpiresOption = Annotated[
    str | None, typer.Option("--consent-expires", help="Consent expiry date YYYY-MM-DD.")
]


def consent_expiry(value: str | None):
    """--consent-expires as a date (None when not given); one-line error otherwise."""
    import datetime as dt

    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise FlexmoeError(f"--consent-expires '{value}' is not YYYY-MM-DD") from None


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
DbOption = Annotated[
    str | None,
    typer.Option(
        help="Shared state database: postgresql://… or a SQLite file (default: STATE/flexmoe.db)."
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


# ---- the range of every numeric option, by name: one meaning per name across all verbs ----
@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is excluded
    hi_open: bool = False

    def describe(self) -> str:
        def num(x: float) -> str:
            return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e19 else f"{x:g}"

        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '≥'} {num(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '≤'} {num(self.hi)}")
        return " and ".join(parts) or "a finite number"

    def holds(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))


BIG = float(1 << 31)  # a sanity ceiling for counts: beyond it a typo, not a wish
RANGES: dict[str, Range] = {
    # counts
    "steps": Range(1, BIG),
    "batch_size": Range(1, 1 << 16),
    "grad_accum": Range(1, 1 << 16),
    "warmup": Range(0, BIG),
    "ckpt_every": Range(1, BIG),
    "eval_every": Range(1, BIG),
    "stop_after": Range(1, BIG),
    "seq_len": Range(2, 1 << 20),  # and ≤ the model's positions, where a model is given
    "max_tokens": Range(1, BIG),
    "max_new_tokens": Range(1, 1 << 20),
    "max_prompt_tokens": Range(1, 1 << 20),
    "max_batch": Range(1, 4096),
    "queue_size": Range(1, 1 << 20),
    "docs": Range(1, 1 << 20),
    "router_docs": Range(1, 100_000),
    "max_owner_docs": Range(1, 1 << 20),
    "public_docs": Range(0, 1 << 20),
    "windows": Range(1, 1 << 16),
    "k": Range(1, 1 << 20),
    "limit": Range(0, BIG),  # 0 = all
    "top_k": Range(1, 1024),
    "preselect": Range(0, 1024),
    "dp_epochs": Range(1, 1 << 16),
    "vocab_size": Range(260, 1 << 20),
    "shard_tokens": Range(1 << 16, BIG),
    "seed": Range(0, 2**63 - 1),
    "port": Range(1, 65535),
    "rank": Range(1, 1 << 20),
    "checkpoint_every": Range(1, BIG),
    "workers": Range(1, 256),
    # real numbers
    "lr": Range(0, 1, lo_open=True),
    "temperature": Range(0, 100),
    "top_p": Range(0, 1, lo_open=True),
    "timeout": Range(0, 7 * 86400, lo_open=True),
    "dp_epsilon": Range(0, 100, lo_open=True),
    "dp_delta": Range(0, 1, lo_open=True, hi_open=True),
    "max_grad_norm": Range(0, None, lo_open=True),
    "max_epsilon": Range(0, None, lo_open=True),
    "public_ratio": Range(0, 64),
    "energy": Range(0, 1, lo_open=True),
    "gate_weight": Range(0, None),
    "owner_gate_weight": Range(0, None),
    "public_weight": Range(0, None),
    "router_lr_scale": Range(0, None, lo_open=True),
    "router_z_loss": Range(0, None),
    "bias_init": Range(None, 0),
}


def _numeric(hint: Any) -> bool:
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return len(args) == 1 and args[0] in (int, float)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validated(fn: Callable) -> Callable:
    """Check a verb's options before its body runs (so before any model loads): every numeric
    option inside its `RANGES` entry (NaN and ±inf refused), --include and --exclude disjoint,
    --seq-len within the positions of the --model/--anchor given. A numeric option without an
    entry is a programming error, raised when the CLI is built."""
    hints = typing.get_type_hints(fn, include_extras=True)
    numeric = [n for n, h in hints.items() if n != "return" and _numeric(h)]
    missing = [n for n in numeric if n not in RANGES]
    if missing:
        raise TypeError(f"{fn.__name__}: no RANGES entry for {', '.join(missing)}")

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        for name in numeric:
            v = kwargs.get(name)
            if v is not None and not RANGES[name].holds(float(v)):
                raise FlexmoeError(f"{_flag(name)} must be {RANGES[name].describe()} (got {v})")
        both = set(split_names(kwargs.get("include")) or ()) & set(
            split_names(kwargs.get("exclude")) or ()
        )
        if both:
            raise FlexmoeError(
                f"--include and --exclude both name {', '.join(sorted(both))}: choose one"
            )
        seq_len = kwargs.get("seq_len")
        for key in ("model", "anchor"):
            if seq_len is not None and isinstance(kwargs.get(key), Path):
                positions = model_positions(kwargs[key])
                if positions is not None and seq_len > positions:
                    raise FlexmoeError(
                        f"--seq-len {seq_len} exceeds the {positions:,} positions of {kwargs[key]}"
                    )
        return fn(**kwargs)

    return wrapper


def model_positions(model_dir: Path) -> int | None:
    """max_position_embeddings from a model directory's config.json (None if it has none)."""
    from flexmoe.store.fsutil import read_json

    cfg = model_dir / "config.json"
    if not cfg.is_file():
        return None
    raw = read_json(cfg, f"{model_dir}: config.json")
    n = raw.get("max_position_embeddings") if isinstance(raw, dict) else None
    return n if type(n) is int and n > 0 else None
