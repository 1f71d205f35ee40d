"""``drbench train`` (one short-schedule training run), ``drbench masks`` and ``drbench list datasets``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from drbench.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from drbench.cli.app import app, console, err_console, fail, list_app
from drbench.cli.options import op_options
from drbench.config import ConfigError, load_config
from drbench.data import DatasetError, get_dataset, get_dataset_spec, list_datasets
from drbench.masks import checkpoint_masks, render_masks
from drbench.measure.accuracy import TrainProgress, TrainRecipe, model_config_for, train
from drbench.measure.stability import StabilityTrace, summarize_trace
from drbench.measure.timing import fixed_threads
from drbench.models import create_model
from drbench.runner import resolve_device


class _EpochBars:
    """One progress bar per epoch on stderr (stdout stays free for --json), each ending with its mean loss."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(), console=err_console,
        )
        self.task = None

    def __enter__(self) -> _EpochBars:
        self.progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.progress.stop()

    def __call__(self, step: TrainProgress) -> None:
        if step.step == 1:
            self.task = self.progress.add_task(
                f"epoch {step.epoch}/{step.epochs}", total=step.steps_per_epoch, loss=""
            )
        loss = "" if step.epoch_loss is None else f"loss {step.epoch_loss:.4f}"
        self.progress.update(self.task, completed=step.step, loss=loss)


@app.command("train")
def train_command(
    model: str = typer.Argument(..., help="Model family (see: drbench list models)."),
    width: float = typer.Option(1.0, "--width", help="Width multiplier."),
    op: str = typer.Option("conv", "--op", help="Operator at the placement's convolutions (see: drbench list ops)."),
    regions: Optional[int] = typer.Option(None, "--regions", help="DRConv regions m (drconv's default: 8)."),
    experts: Optional[int] = typer.Option(None, "--experts", help="CondConv experts (condconv's default: 8)."),
    option: Optional[list[str]] = typer.Option(
        None, "--option", help="Any other operator option as KEY=VALUE, repeatable: init=independent, "
        "guide_bias=true, generator=static (see: drbench list ops).",
    ),
    placement: str = typer.Option("default", "--placement", help="Which convolutions become --op."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Data set (default: data.dataset, 'synthetic')."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Folder of an on-disk data set (default: data.data_path)."
    ),
    data_seed: int = typer.Option(0, "--data-seed", help="Seed of the data set itself (synthetic images, splits)."),
    train_images: Optional[int] = typer.Option(None, "--train-images", min=1, help="Train on the first N only."),
    test_images: Optional[int] = typer.Option(None, "--test-images", min=1, help="Evaluate on the first N only."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: the recipe's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: the recipe's)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: the recipe's)."),
    warmup: Optional[float] = typer.Option(None, "--warmup", help="Warm-up epochs (default: the recipe's)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="linear (the paper's) or cosine."),
    clip_grad: Optional[float] = typer.Option(
        None, "--clip-grad", help="Largest gradient norm of a step (default: the recipe's); 0 for no clipping."),
    agc: Optional[float] = typer.Option(
        None, "--agc", help="Adaptive gradient clipping factor: each unit's gradient norm at most this times its "
        "weight norm (default: the recipe's); 0 for none."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Stop after this many seconds."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, data order and augmentation."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or auto (default: run.device)."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch threads (default 0: torch's, all cores)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Save the trained model here (.pt)."),
    trace: Optional[Path] = typer.Option(
        None, "--trace", help="Write per-step stability instruments here (JSON lines): update-to-weight ratios, "
        "output change and region-mask churn on a fixed probe batch (drbench.measure.stability).",
    ),
    trace_every: int = typer.Option(1, "--trace-every", min=1, help="Trace one optimiser step in this many."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table."),
) -> None:
    """Train MODEL with --op on a data set with drbench's short-schedule recipe; report held-out top-1/top-5."""
    try:
        config = load_config(overrides={"run.device": device, "data.dataset": dataset,
                                        "data.data_path": None if data is None else str(data)})
        recipe_values = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "warmup_epochs": warmup,
                         "schedule": schedule, "clip_grad_norm": clip_grad, "agc_factor": agc,
                         "time_budget_s": time_budget}
        recipe = TrainRecipe(**{key: value for key, value in recipe_values.items() if value is not None})
        data_path = config.get("data.data_path")
        # absolute, so that a checkpoint finds its data from any working directory (drbench masks)
        data_path = None if data_path is None else str(Path(data_path).expanduser().resolve())
        source = {"name": config.get("data.dataset"), "data_path": data_path, "seed": data_seed}
        train_set = get_dataset(split="train", limit=train_images, **source)
        test_set = get_dataset(split="test", limit=test_images, **source)
        model_config = model_config_for(
            model, train_set, width=width, op=op, placement=placement,
            **op_options(op, option, regions=regions, experts=experts),
        )
        create_model(**model_config)  # a wrong model, width or option fails here, before any training
        chosen_device = resolve_device(config.get("run.device"))
    except (ConfigError, DatasetError, ValueError, TypeError) as error:
        fail(str(error))

    stability = None
    if trace is not None:
        stability = StabilityTrace.on_dataset(train_set, chosen_device, every=trace_every)
    # unlike a latency cell, training is not timed against other cells: it may use every core
    with fixed_threads(threads), _EpochBars() as bars:
        trained = train(lambda: create_model(**model_config), train_set, test_set, recipe, seed=seed,
                        device=chosen_device, progress=bars, trace=stability)
    result = trained.result
    if stability is not None:
        _write_trace(trace, stability)
    if checkpoint is not None:
        Checkpoint(model_config, trained.model.state_dict(), trained.normalization, source, result.to_dict()).save(
            checkpoint
        )
    summary: dict[str, Any] = {
        **result.to_dict(),
        "model": model_config,
        "dataset": {**source, "train_images": len(train_set), "test_images": len(test_set)},
        "checkpoint": None if checkpoint is None else str(checkpoint),
    }
    if as_json:
        print(json.dumps(summary))
    else:
        _print_result(summary)
    if result.status == "diverged":
        epoch = result.diverged_at_epoch
        err_console.print(f"[yellow]warning:[/] training diverged (non-finite loss in epoch {epoch})")


def _write_trace(path: Path, stability: StabilityTrace) -> None:
    """The trace as JSON lines, then its summary on stderr (stdout stays free for --json)."""
    try:
        path.write_text(stability.to_jsonl(), encoding="utf-8")
    except OSError as error:
        fail(f"cannot write the trace {path}: {error}")
    summary = summarize_trace(stability.steps)
    err_console.print(f"stability trace ({len(stability.steps)} steps) written to {escape(str(path))}: "
                      f"{escape(json.dumps(summary))}")


def _print_result(summary: dict[str, Any]) -> None:
    model = summary["model"]
    table = Table(title=f"{model['name']} {model['width']:g}x {model['op']} on {summary['dataset']['name']}",
                  title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    accuracy = "diverged" if summary["top1"] is None else f"{summary['top1']:.2f}%"
    table.add_row("top-1 (held-out)", accuracy)
    table.add_row(f"top-{summary['topk']}", "-" if summary["top5"] is None else f"{summary['top5']:.2f}%")
    table.add_row("train loss by epoch", " ".join(f"{loss:.3f}" for loss in summary["train_loss"]) or "-")
    table.add_row("epochs", f"{summary['epochs_run']:g} of {summary['epochs']}")
    table.add_row("train time", f"{summary['train_time_s']:.1f} s ({summary['images_per_s']:.0f} images/s)")
    table.add_row("device, threads", f"{summary['device']}, {summary['threads']}")
    if summary["checkpoint"]:
        table.add_row("checkpoint", escape(summary["checkpoint"]))
    console.print(table)


@app.command("masks")
def masks_command(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by drbench train --checkpoint (--op drconv)."),
    images: int = typer.Option(4, "--images", min=1, help="Held-out images to show, one per row."),
    layers: int = typer.Option(6, "--layers", min=0, help="DRConv layers to show, evenly spaced (0: all)."),
    out: Path = typer.Option(Path("masks.png"), "--out", help="PNG file to write."),
) -> None:
    """Render held-out images beside each DRConv layer's guided mask (one colour per region), as the paper's Fig. 3."""
    try:
        shown, masks = checkpoint_masks(load_checkpoint(checkpoint), images)
    except (CheckpointError, DatasetError, ValueError) as error:
        fail(str(error))
    written = render_masks(shown, masks, out, max_layers=layers)
    shown_layers = min(len(masks), layers or len(masks))
    console.print(
        f"wrote {escape(str(written))}: {shown.shape[0]} images x {shown_layers} of {len(masks)} DRConv layers",
        soft_wrap=True,
    )


@list_app.command("datasets")
def list_datasets_command() -> None:
    """The data sets drbench can train on (none is ever downloaded)."""
    table = Table()
    for column in ("name", "from", "options", "description"):
        table.add_column(column)
    for name in list_datasets():
        spec = get_dataset_spec(name)
        table.add_row(name, "--data PATH" if spec.needs_path else "built in", ", ".join(spec.options) or "-",
                      spec.description)
    console.print(table)
