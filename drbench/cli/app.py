"""The Typer application that every command module attaches to.

The CLI is a thin layer: each command parses its flags, calls drbench's Python API and presents the result.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

import drbench
from drbench.results import StoreWarning


class _Group(TyperGroup):
    """The command group: an operating-system error that reaches it (a read-only or full disk, a name too long
    for the file system) ends the command with one line naming the file and exit code 1, not a traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as error:
            fail(os_error_message(error), code=1)


def os_error_message(error: OSError) -> str:
    """``path: reason`` of an operating-system error (both paths of a rename or copy)."""
    files = [str(name) for name in (error.filename, error.filename2) if name is not None]
    reason = error.strerror or str(error)
    return f"{' -> '.join(files)}: {reason}" if files else reason

app = typer.Typer(
    name="drbench",
    help="Benchmark and ablate dynamic and region-aware convolutions (DRConv, CondConv, local conv) "
    "against standard convolution on real models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)
list_app = typer.Typer(help="List what drbench knows: operators, models, suites.", no_args_is_help=True)
app.add_typer(list_app, name="list")

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Report a user error in one line on stderr and exit with ``code`` (2: bad input, 1: the environment), no
    traceback. ``message`` is plain text: brackets in it are printed, never read as Rich markup."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """One warning line on stderr; ``message`` is plain text, as in :func:`fail`."""
    err_console.print(Text.assemble(("warning:", "yellow"), " ", message), highlight=False, soft_wrap=True)


@contextlib.contextmanager
def store_warnings() -> Iterator[None]:
    """Print each line the results store skipped (:class:`StoreWarning`) as one warning, even when the block
    fails, and once even when the block read the store twice (``status`` plans, then reads; ``compare`` reads
    both sides)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StoreWarning)
        try:
            yield
        finally:
            skipped = [str(w.message) for w in caught if issubclass(w.category, StoreWarning)]
            for message in dict.fromkeys(skipped):
                warn(message)


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
