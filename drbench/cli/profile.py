"""``drbench profile`` (MACs, parameters and executed FLOPs of a model) and ``drbench list models``."""

from __future__ import annotations

import json
import warnings
from typing import Any, Optional

import typer
from rich.table import Table

from drbench.cli.app import app, console, fail, list_app, warn
from drbench.cli.options import op_options
from drbench.measure.complexity import Complexity, complexity
from drbench.models import create_model, get_model, list_models
from drbench.suite import MAX_INPUT_SIZE


def parse_input_size(text: str) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"112x96"`` -> (112, 96)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() and 0 < int(part) <= MAX_INPUT_SIZE
                                           for part in parts):
        raise ValueError(f"--input-size must be a positive size up to {MAX_INPUT_SIZE} such as 224 or 112x96, "
                         f"got {text!r}")
    height, width = (int(parts[0]), int(parts[-1]))
    return height, width


def _millions(count: int) -> str:
    return f"{count / 1e6:,.2f}M"


def _print_tables(title: str, cost: Complexity, by_layer: bool) -> None:
    totals = Table(title=title, title_justify="left")
    totals.add_column("measure")
    totals.add_column("value", justify="right")
    totals.add_column("counted as")
    totals.add_row("MACs", _millions(cost.macs), "multiply-adds of conv and linear layers (the papers' convention)")
    totals.add_row("params", _millions(cost.params), "learnable parameters")
    totals.add_row("executed FLOPs", _millions(cost.executed_flops), "what the implementation computes (2 per MAC)")
    console.print(totals)
    if by_layer:
        layers = Table(title="by layer", title_justify="left")
        for column in ("module", "MACs", "% of MACs", "params"):
            layers.add_column(column, justify="left" if column == "module" else "right")
        for layer in cost.by_layer:
            share = f"{100 * layer.macs / cost.macs:.1f}" if cost.macs else "-"
            layers.add_row(layer.name, _millions(layer.macs), share, _millions(layer.params))
        console.print(layers)
    if cost.unsupported_ops:
        listed = ", ".join(f"{name} x{count}" for name, count in cost.unsupported_ops.items())
        warn(f"not counted (no rule): {listed}")


@app.command("profile")
def profile_command(
    model: str = typer.Argument(..., help="Model family (see: drbench list models)."),
    width: float = typer.Option(1.0, "--width", help="Width multiplier."),
    op: str = typer.Option("conv", "--op", help="Operator at the placement's convolutions (see: drbench list ops)."),
    regions: Optional[int] = typer.Option(None, "--regions", help="DRConv regions m (drconv's default: 8)."),
    experts: Optional[int] = typer.Option(None, "--experts", help="CondConv experts (condconv's default: 8)."),
    input_size: Optional[str] = typer.Option(
        None, "--input-size", help="224 or HxW such as 112x96 (default: the family's, 224 or 112)."
    ),
    placement: str = typer.Option("default", "--placement", help="Which convolutions become --op."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images per counted forward pass."),
    by_layer: bool = typer.Option(False, "--by-layer", help="Also break the counts down by stage."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables."),
) -> None:
    """Count a model's MACs and parameters as the papers do, and the FLOPs its implementation executes.

    Example: drbench profile shufflenetv2 --width 0.5 --op drconv --regions 8
    """
    try:
        options = op_options(op, regions=regions, experts=experts)
        size = parse_input_size(input_size) if input_size else get_model(model).input_size
        network = create_model(model, width=width, op=op, input_size=size, placement=placement, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unsupported operators are reported from cost.unsupported_ops
            cost = complexity(network, size, batch_size=batch_size)
    except (ValueError, TypeError) as error:
        fail(str(error))
    arguments: dict[str, Any] = {
        "model": model, "width": width, "op": op, "op_options": options, "placement": placement,
    }
    if as_json:
        result = {**arguments, **cost.to_dict()}
        if not by_layer:
            del result["by_layer"]
        typer.echo(json.dumps(result))
        return
    described = ", ".join(f"{key}={value}" for key, value in options.items())
    title = (
        f"{model} {width}x, op {op}{f' ({described})' if described else ''}, placement {placement}, "
        f"input {'x'.join(map(str, cost.input_size))}, batch {batch_size}"
    )
    _print_tables(title, cost, by_layer)


@list_app.command("models")
def list_models_command() -> None:
    """List the model families with their widths and operator placements."""
    table = Table(title="Models (placement: which convolutions --op replaces)")
    for column in ("model", "widths", "placement", "replaces"):
        table.add_column(column, style="bold" if column == "model" else None)
    for name in list_models():
        spec = get_model(name)
        widths = ", ".join(map(str, spec.widths)) + (" or any between" if spec.any_width else "")
        for index, (key, placement) in enumerate(spec.placements.items()):
            first, last = index == 0, index == len(spec.placements) - 1
            table.add_row(name if first else "", widths if first else "", key, placement.description,
                          end_section=last)
    console.print(table)
