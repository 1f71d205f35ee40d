"""The Typer application that every command module attaches to.

The CLI is a thin layer: each command parses its flags, calls drbench's Python API and presents the result.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

import drbench

app = typer.Typer(
    name="drbench",
    help="Benchmark and ablate dynamic and region-aware convolutions (DRConv, CondConv, local conv) "
    "against standard convolution on real models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
list_app = typer.Typer(help="List what drbench knows: operators, models, suites.", no_args_is_help=True)
app.add_typer(list_app, name="list")

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Report a user error in one line on stderr and exit with ``code`` (2: bad input), no traceback."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"drbench {drbench.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print drbench's version and exit."
    ),
) -> None:
    """Benchmark and ablate dynamic and region-aware convolutions."""
