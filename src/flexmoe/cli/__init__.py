"""The `flexmoe` command: one verb per lifecycle stage (data → anchor → expert → merge → generate
→ eval). Library code raises FlexmoeError; this module turns it into one line and exit code 2.

The verbs live in one module per stage (data, anchor, expert, merge, generate, evaluate, serve);
options that several verbs share are declared once in `options`."""

# Library imports are inside each command: --help and argument errors answer without loading torch.

from __future__ import annotations

import sys

import typer
from rich.console import Console

from flexmoe.errors import FlexmoeError

app = typer.Typer(
    help="flexmoe: FlexOlmo-style LMs — a public anchor, private experts, exact opt-out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class SafeConsole(Console):
    """Rich console for text that may come from untrusted packages, manifests, paths or model
    output: markup is never interpreted and control characters are shown escaped (clean)."""

    def print(self, *objects, **kwargs) -> None:  # noqa: D102
        kwargs.setdefault("soft_wrap", True)
        cleaned = (clean(o, limit=1 << 20) if isinstance(o, str) else o for o in objects)
        super().print(*cleaned, **kwargs)


console = SafeConsole(stderr=True, markup=False, highlight=False)
out = SafeConsole(markup=False, highlight=False)


def clean(text: object, limit: int = 2000) -> str:
    """Untrusted text for the terminal: control and format characters shown as escapes (no
    terminal escape sequences, no bidi tricks), bounded length. Print it with markup off."""
    import unicodedata

    s = str(text)
    if len(s) > limit:
        s = s[:limit] + "…"
    return "".join(
        c
        if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
        else c.encode("unicode_escape").decode("ascii")
        for c in s
    )


def _error(message: str, code: int) -> None:
    from rich.text import Text

    line = Text("error: ", style="bold red") + Text(clean(message).replace("\n", " "))
    console.print(line, highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    import os

    # before transformers is imported (it reads this once): no progress bars in CLI output
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (in-process callers): tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:  # typer ≥ 0.2x vendors click
        import typer._click.exceptions as click_errors
    except ImportError:  # pragma: no cover
        import click.exceptions as click_errors

    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except FlexmoeError as e:
        _error(str(e), e.exit_code)
    except click_errors.NoArgsIsHelpError:  # typer has printed the help
        sys.exit(2)
    except click_errors.UsageError as e:
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _error(e.format_message() + where, 2)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except (SystemExit, typer.Exit):
        raise
    except OSError as e:  # the machine said no (permissions, a full disk, a path's kind)
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or e}", 2)
    except Exception as e:  # a bug, not bad input: one line, the traceback on request
        if os.environ.get("FLEXMOE_DEBUG") == "1":
            raise
        _error(
            f"internal error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "rerun with FLEXMOE_DEBUG=1 for the traceback and please report it",
            1,
        )
    finally:
        if "torch.distributed" in sys.modules:  # a refusal never imports torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


# ---- the verbs (imported last: their modules use app, console, out and clean from here) ----
# `flexmoe --help` lists top-level commands in the order registered here, then the groups.
from flexmoe.cli import anchor, data, evaluate, expert, generate, merge, serve  # noqa: E402
from flexmoe.cli.export import export_app  # noqa: E402
from flexmoe.cli.importing import import_app  # noqa: E402

app.command("report")(evaluate.report)
app.command("merge")(merge.merge_cmd)
app.command("generate")(generate.generate_cmd)
app.command("router-tune")(merge.router_tune_cmd)
app.command("serve")(serve.serve_cmd)
app.command("audit")(evaluate.audit_cmd)
app.add_typer(data.data_app, name="data")
app.add_typer(anchor.anchor_app, name="anchor")
app.add_typer(expert.expert_app, name="expert")
app.add_typer(evaluate.eval_app, name="eval")
app.add_typer(expert.keys_app, name="keys")
app.add_typer(serve.ledger_app, name="ledger")
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")


def _validate_all(t: typer.Typer) -> None:
    """Every verb's options are checked before it runs (options.validated), in one place."""
    from flexmoe.cli.options import validated

    for c in t.registered_commands:
        c.callback = validated(c.callback)
    for g in t.registered_groups:
        _validate_all(g.typer_instance)


_validate_all(app)
