"""``drbench list ops``: the registered convolution operators."""

from __future__ import annotations

from rich.table import Table

from drbench.cli.app import console, list_app
from drbench.ops import get_op, list_ops


@list_app.command("ops")
def list_ops_command() -> None:
    """List the registered operators, with the options a suite can set for each."""
    table = Table(title="Operators")
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("options")
    for name in list_ops():
        spec = get_op(name)
        options = list(spec.options) + (["input_size (required)"] if spec.needs_input_size else [])
        table.add_row(name, spec.description, ", ".join(options) or "-")
    console.print(table)
