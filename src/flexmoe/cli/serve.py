"""`flexmoe serve` (OpenAI-compatible API, per-request experts) and `flexmoe ledger`."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flexmoe.cli import clean, console, out
from flexmoe.cli.options import DbOption, DeviceOption, StateOption
from flexmoe.errors import FlexmoeError

ledger_app = typer.Typer(help="The serving usage ledger (for crediting data owners).")


def serve_cmd(
    model: Annotated[Path, typer.Option(help="A merged model (or dense anchor) directory.")],
    host: Annotated[str, typer.Option(help="Address to bind (default: this machine only).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    keys: Annotated[
        Path | None, typer.Option(help="Keys file (TOML): tenants, key hashes, admin key hash.")
    ] = None,
    state: StateOption = None,
    device: DeviceOption = "auto",
    max_batch: Annotated[int, typer.Option(help="Requests decoded together.")] = 16,
    batching: Annotated[
        str, typer.Option(help="continuous (requests join and leave the running batch) | static")
    ] = "continuous",
    queue_size: Annotated[int, typer.Option(help="Waiting requests before 503.")] = 64,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask.")] = 256,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt, in tokens.")] = 1024,
    timeout: Annotated[float, typer.Option(help="Seconds before a request gets 504.")] = 120.0,
    db: DbOption = None,
    signing_key: Annotated[
        Path | None,
        typer.Option(help="Ed25519 key (`flexmoe keys new`) that signs ledger checkpoints."),
    ] = None,
    checkpoint_every: Annotated[
        int, typer.Option(help="Sign a ledger checkpoint every N rows (and every 10 s).")
    ] = 64,
    workers: Annotated[
        int, typer.Option(help="Server processes on this host (each loads the model).")
    ] = 1,
) -> None:
    """Serve a merged model over an OpenAI-compatible API with per-request experts."""
    import json
    import os
    import socket

    import uvicorn

    from flexmoe.serving import Limits, Server, create_app
    from flexmoe.serving.db import database_url

    if db is not None:
        database_url(db, Path("."))  # a bad URL is refused before the model loads
    if batching not in ("continuous", "static"):
        raise FlexmoeError(f"--batching must be continuous or static (got {batching[:40]!r})")
    try:  # the bind address, before the model loads
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except (OSError, UnicodeError) as e:
        raise FlexmoeError(f"--host {host!r} --port {port}: cannot bind ({e})") from None
    limits = dict(
        max_prompt_tokens=max_prompt_tokens,
        max_tokens=max_tokens,
        queue_size=queue_size,
        max_batch=max_batch,
        timeout_s=timeout,
        batching=batching,
    )
    config = dict(
        model_dir=str(model),
        state_dir=None if state is None else str(state),
        device=device,
        db=db,
        signing_key=None if signing_key is None else str(signing_key),
        checkpoint_every=checkpoint_every,
    )
    # this process loads everything once (refusals happen here, before any worker starts); the
    # keys file is imported into the shared database now, so workers do not race to import it
    server = Server(**config, keys=keys, limits=Limits(**limits))
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"note: listening on {host}: reachable from other machines", style="yellow")
    if server.keys.open:
        console.print("note: no --keys: every request is the anonymous tenant", style="yellow")
    else:
        where = keys or "the state database"
        console.print(
            f"{len(server.keys.tenants)} tenant(s) from {where}: every request needs a key"
        )
    if workers > 1:
        del server
        os.environ["FLEXMOE_SERVE"] = json.dumps({**config, "limits": limits, "workers": workers})
        uvicorn.run(
            "flexmoe.serving.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="warning",
        )
        return
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning")


@ledger_app.command("summarize")
def ledger_summarize(
    ledger: Annotated[Path, typer.Argument(help="ledger.jsonl written by `flexmoe serve`.")],
) -> None:
    """Routed tokens per expert and tenant (generated tokens × routing share)."""
    from flexmoe.serving.ledger import summarize_ledger

    totals = summarize_ledger(ledger)
    experts = sorted({e for per in totals.values() for e in per})
    table = Table(title=f"routed tokens per expert: {ledger}")
    table.add_column("tenant")
    for e in experts:
        table.add_column(clean(e), justify="right")
    for tenant, per in sorted(totals.items()):
        table.add_row(clean(tenant), *[f"{per.get(e, 0.0):,.1f}" for e in experts])
    out.print(table)


@ledger_app.command("verify")
def ledger_verify(
    db: Annotated[str, typer.Argument(help="The state database: a SQLite file or postgresql://…")],
    public_key: Annotated[
        Path | None,
        typer.Option(help="The operator's public key (`KEY.pub`): checkpoints must be its."),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="A checkpoint saved from GET /ledger/checkpoint: must still hold."),
    ] = None,
) -> None:
    """Check the ledger's hash chain and signed checkpoints; print routed tokens per owner."""
    import json

    from flexmoe.serving.db import StateDB, database_url
    from flexmoe.serving.ledger import parse_checkpoint
    from flexmoe.store.fsutil import regular_file
    from flexmoe.store.signing import load_trusted_keys

    trusted = load_trusted_keys(public_key) if public_key is not None else None
    pinned = None
    if checkpoint is not None:
        text = regular_file(checkpoint, "checkpoint file", 1 << 16).read_bytes()
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FlexmoeError(f"{checkpoint}: not JSON") from None
        pinned = parse_checkpoint(raw, str(checkpoint))
    store = StateDB(database_url(db, Path(".")), create=False)
    try:
        v = store.verify(trusted, pinned)
    finally:
        store.close()
    t = v.totals
    table = Table(title="routed tokens per owner (generated tokens × routing share)")
    table.add_column("owner")
    table.add_column("routed tokens", justify="right")
    for owner, n in sorted(t.by_owner.items()):
        table.add_row(clean(owner), f"{n:,.1f}")
    out.print(table)
    experts = sorted({e for per in t.by_tenant.values() for e in per})
    table = Table(title="routed tokens per tenant and expert")
    table.add_column("tenant")
    for e in experts:
        table.add_column(clean(e), justify="right")
    for tenant, per in sorted(t.by_tenant.items()):
        table.add_row(clean(tenant), *[f"{per.get(e, 0.0):,.1f}" for e in experts])
    out.print(table)
    out.print(f"chain: {v.head_seq} rows, intact; head {v.head_hash[:16]}…")
    if trusted is None:
        out.print(
            f"{v.checkpoints} checkpoint(s) match the chain; signatures NOT checked "
            "(give --public-key)"
        )
    else:
        out.print(f"{v.checkpoints} checkpoint(s), all signed by a trusted key and matching")
    if v.signed_upto < v.head_seq:
        console.print(
            f"note: rows {v.signed_upto + 1}–{v.head_seq} are after the last checkpoint: an edit "
            "there would be caught, rows cut off the end would not",
            style="yellow",
        )


@ledger_app.command("import")
def ledger_import(
    ledger: Annotated[Path, typer.Argument(help="ledger.jsonl written by an older flexmoe serve.")],
    db: Annotated[str, typer.Option(help="The state database: a SQLite file or postgresql://…")],
) -> None:
    """Append a JSONL ledger's records to the database's chain (every line checked first)."""
    from flexmoe.serving.db import StateDB, database_url

    store = StateDB(database_url(db, Path(".")))
    try:
        n = store.import_jsonl(ledger)
    finally:
        store.close()
    out.print(f"{n} record(s) from {ledger} appended to the ledger")
