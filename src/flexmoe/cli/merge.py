"""`flexmoe merge` (anchor + verified packages → one MoE) and `flexmoe router-tune`."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexmoe.cli import console, out
from flexmoe.cli.options import (
    AllowNoPublicOption,
    BatchSizeOption,
    DeviceOption,
    DtypeOption,
    ExcludeOption,
    IncludeOption,
    OverwriteOption,
    RestartOption,
    ResumeOption,
    SeqLenOption,
    StepsOption,
    UseOption,
    WarmupOption,
    check_use,
    split_names,
)
from flexmoe.errors import FlexmoeError


def merge_cmd(
    anchor: Annotated[Path, typer.Option(help="The anchor directory every expert was built on.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Merged model directory to write.")],
    experts: Annotated[
        list[str] | None,
        typer.Option("--experts", help="Expert package dirs (repeat or comma-separate)."),
    ] = None,
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    top_k: Annotated[
        int | None, typer.Option(help="Active experts per token (default min(E, 4)).")
    ] = None,
    use: UseOption = None,
    base: Annotated[
        Path | None, typer.Option(help="An existing merged model to add to / remove from.")
    ] = None,
    add: Annotated[list[str] | None, typer.Option(help="Package dirs to append to --base.")] = None,
    remove: Annotated[
        list[str] | None, typer.Option(help="Expert names to drop from --base.")
    ] = None,
    allow_no_public: AllowNoPublicOption = False,
    preselect: Annotated[
        int | None,
        typer.Option(
            help="Stored default of request-level preselection: public + M experts per request "
            "(0 = token routing alone; default 1 when every package has a domain embedding)."
        ),
    ] = None,
    preselect_hidden: Annotated[
        bool,
        typer.Option(
            help="Preselection also compares the anchor's hidden states with the packages' "
            "hidden centroids (better on short prompts, worse on math windows: README)."
        ),
    ] = False,
    trusted_keys: Annotated[
        Path | None,
        typer.Option(help="Admit only packages signed by a key in this file (keys new → .pub)."),
    ] = None,
    max_epsilon: Annotated[
        float | None, typer.Option(help="Admit only DP-trained packages with ε ≤ this.")
    ] = None,
    overwrite: OverwriteOption = False,
    more_experts: Annotated[
        list[str] | None,
        typer.Argument(help="More package dirs (as in --experts a b c).", show_default=False),
    ] = None,
) -> None:
    """Verify every package, then merge anchor + experts into one MoE (atomic)."""
    from flexmoe.lifecycle.merge import merge

    check_use(use)
    pkgs = [Path(p) for p in (split_names(experts) or []) + (more_experts or [])]
    if not pkgs and not add and base is None:
        raise FlexmoeError("give expert packages with --experts (or --base with --add/--remove)")
    res = merge(
        anchor,
        pkgs,
        out_dir,
        include=split_names(include),
        exclude=split_names(exclude),
        top_k=top_k,
        use=use,
        allow_no_public=allow_no_public,
        base=base,
        add=[Path(p) for p in split_names(add) or []],
        remove=split_names(remove) or [],
        log=lambda msg: console.print(msg, style="yellow"),
        preselect=-1 if preselect is None else preselect,
        preselect_hidden=preselect_hidden,
        overwrite=overwrite,
        trusted_keys=trusted_keys,
        max_epsilon=max_epsilon,
    )
    out.print(
        f"merged {len(res.experts)} experts ({', '.join(res.experts)}), top-k {res.top_k} "
        f"→ {res.path}"
    )


def router_tune_cmd(
    model: Annotated[Path, typer.Option(help="A merged model directory.")],
    proxies: Annotated[
        list[Path], typer.Option("--proxies", help="Owners' proxies.json files (repeatable).")
    ],
    public: Annotated[Path, typer.Option(help="The public jsonl(.xz) the proxies index.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Tuned merged model to write.")],
    more_proxies: Annotated[
        list[Path] | None, typer.Argument(help="More proxies files (after --proxies P1).")
    ] = None,
    tokenizer_from: Annotated[
        Path | None, typer.Option(help="Tokenizer directory (default: --model).")
    ] = None,
    public_docs: Annotated[int, typer.Option(help="Public documents added to the proxies.")] = 1000,
    steps: StepsOption = None,
    batch_size: BatchSizeOption = None,
    seq_len: SeqLenOption = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 2e-3).")] = None,
    warmup: WarmupOption = None,
    seed: Annotated[int, typer.Option(help="Seed for the public sample and data order.")] = 0,
    resume: ResumeOption = False,
    overwrite: OverwriteOption = False,
    restart: RestartOption = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
) -> None:
    """Tune only the routers (top-k = all experts) on proxies + public data. The exact opt-out
    guarantee holds for the un-tuned model only."""
    from flexmoe.lifecycle.router_tune import router_tune

    files = [*proxies, *(more_proxies or [])]
    res = router_tune(
        model,
        files,
        public,
        out_dir,
        tokenizer_from=tokenizer_from,
        public_docs=public_docs,
        resume=resume,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        warmup=warmup,
        seed=seed,
        overwrite=overwrite,
        restart=restart,
        device=device,
        dtype=dtype,
    )
    if not res.get("stopped"):
        out.print(
            f"router-tuned {res['steps']} steps on {res['proxy_documents']} proxy + "
            f"{res['public_documents']} public documents (final loss {res['final_loss']:.4f}) "
            f"→ {out_dir}"
        )
        console.print(
            "note: exact opt-out holds for the un-tuned model only (RT changed every router row)",
            style="yellow",
        )
