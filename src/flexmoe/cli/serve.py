"""`flexmoe serve` (OpenAI-compatible API, per-request experts) and `flexmoe ledger`."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flexmoe.cli import clean, console, out
from flexmoe.cli.options import DeviceOption, StateOption
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
    queue_size: Annotated[int, typer.Option(help="Waiting requests before 503.")] = 64,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask.")] = 256,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt, in tokens.")] = 1024,
    timeout: Annotated[float, typer.Option(help="Seconds before a request gets 504.")] = 120.0,
) -> None:
    """Serve a merged model over an OpenAI-compatible API with per-request experts."""
    import socket

    import uvicorn

    from flexmoe.serving import Limits, Server, create_app

    try:  # the bind address, before the model loads
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except (OSError, UnicodeError) as e:
        raise FlexmoeError(f"--host {host!r} --port {port}: cannot bind ({e})") from None
    limits = Limits(
        max_prompt_tokens=max_prompt_tokens,
        max_tokens=max_tokens,
        queue_size=queue_size,
        max_batch=max_batch,
        timeout_s=timeout,
    )
    server = Server(model, keys=keys, state_dir=state, limits=limits, device=device)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"note: listening on {host}: reachable from other machines", style="yellow")
    if server.keys.open:
        console.print("note: no --keys: every request is the anonymous tenant", style="yellow")
    else:
        console.print(
            f"{len(server.keys.tenants)} tenant(s) from {keys}: every request needs a key"
        )
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
