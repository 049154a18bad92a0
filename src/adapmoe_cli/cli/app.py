"""Root of the CLI: wires the command modules and turns library errors into one line and an exit code
(`--debug` or ADAPMOE_DEBUG=1 shows the traceback instead)."""

from __future__ import annotations

import inspect
import os
import sys

import typer
from rich.markup import escape

from adapmoe_cli import __version__
from adapmoe_cli.cli import (
    bench,
    chat,
    download,
    evaluate,
    fit,
    info,
    plan_cache,
    profile,
    serve,
    shard,
    simulate,
    stores,
    verify,
)
from adapmoe_cli.cli.common import err_console
from adapmoe_cli.errors import AdapmoeError

app = typer.Typer(
    name="adapmoe",
    help="Run Mixture-of-Experts language models with experts offloaded to disk (AdapMoE).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
for module in (chat, serve, profile, plan_cache, evaluate, bench, simulate, fit, shard, download, info, verify, stores):
    module.register(app)
for command in app.registered_commands:  # each command's docstring (notes, examples) closes its --help
    if command.callback is not None and command.callback.__doc__ and not command.epilog:
        command.epilog = inspect.cleandoc(command.callback.__doc__)


def _version(value: bool) -> None:
    if value:
        print(f"adapmoe {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Print the version."),
) -> None:
    if debug:
        os.environ["ADAPMOE_DEBUG"] = "1"


def _debug() -> bool:
    return os.environ.get("ADAPMOE_DEBUG", "") not in ("", "0") or "--debug" in sys.argv[1:]


def _click_exceptions() -> tuple[type[Exception], ...]:
    """Usage errors are ClickExceptions; typer >= 0.2x raises those of its vendored copy of click."""
    import click

    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        return (click.ClickException,)
    return (click.ClickException, ClickException)


def main() -> None:
    if "--debug" in sys.argv[2:]:  # accepted after the command name too (`adapmoe chat --debug`)
        sys.argv = [sys.argv[0], "--debug", *[a for a in sys.argv[1:] if a != "--debug"]]
    try:
        # without standalone mode click *returns* the code of a `typer.Exit(n)` (and 130 for Ctrl-C)
        code = app(standalone_mode=False)
        if isinstance(code, int) and code != 0:
            if code == 130:
                err_console.print("interrupted")
            sys.exit(code)
    except AdapmoeError as e:
        if _debug():
            raise
        err_console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)  # paths may hold [...]
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # click's own usage errors
        if isinstance(e, _click_exceptions()):
            e.show()
            sys.exit(e.exit_code)
        if _debug():
            raise
        err_console.print(
            f"[red]error:[/] unexpected {type(e).__name__}: {escape(str(e))} (run with --debug for the traceback)",
            soft_wrap=True,
        )
        sys.exit(1)
