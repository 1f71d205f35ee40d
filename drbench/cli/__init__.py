"""Command-line interface: ``drbench --help``. Each command module registers itself on :data:`app`."""

from drbench.cli import compare  # noqa: F401  (registers commands)
from drbench.cli import continuous  # noqa: F401  (registers commands)
from drbench.cli import ops  # noqa: F401  (registers commands)
from drbench.cli import profile  # noqa: F401  (registers commands)
from drbench.cli import report  # noqa: F401  (registers commands)
from drbench.cli import run  # noqa: F401  (registers commands)
from drbench.cli import status  # noqa: F401  (registers commands)
from drbench.cli import train  # noqa: F401  (registers commands)
from drbench.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
