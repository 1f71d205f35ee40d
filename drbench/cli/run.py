"""``drbench run``, ``drbench show``, ``drbench config`` and ``drbench list suites``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from drbench.cli.app import app, console, err_console, fail, list_app, store_warnings, warn
from drbench.cli.options import (
    CONFIG_OPTION, DEVICE_OPTION, RESULTS_DIR_OPTION, THREADS_OPTION, load_cli_config, load_cli_suite,
)
from drbench.config import Config
from drbench.executors import ExecutorError, interference_warning
from drbench.metric_registry import format_value, quantities
from drbench.results import StoreLockedError, load
from drbench.runner import RunInterrupted, RunSummary, plan, run_suite
from drbench.suite import CELL_KEYS, Cell, Suite, SuiteError, list_suites, load_suite, option_names

@app.command("run")
def run_command(
    suite: str = typer.Argument(..., help="Suite file (suites/quick.yaml) or suite name (quick)."),
    results_dir: Optional[Path] = RESULTS_DIR_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    threads: Optional[int] = THREADS_OPTION,
    only: Optional[str] = typer.Option(
        None, "--only", help="Run only matching cells: key=value[|value],... e.g. 'op=drconv|conv,width=0.5'."
    ),
    force: bool = typer.Option(False, "--force", help="Measure cells again even if already stored."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the cells and exit."),
    executor: Optional[str] = typer.Option(
        None, "--executor", help="local (this process), process (worker processes) or slurm (submitit jobs); "
        "default: executor.name."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="process: worker processes at once."),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", min=0, help="process: seconds a cell may run before its worker is killed (0: none)."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="process: one worker per GPU, e.g. 0,1."),
    partition: Optional[str] = typer.Option(None, "--partition", help="slurm: partition."),
    slurm_time: Optional[int] = typer.Option(None, "--slurm-time", min=1, help="slurm: job time limit, minutes."),
    gpus_per_task: Optional[int] = typer.Option(None, "--gpus-per-task", min=0, help="slurm: GPUs per job."),
    array_parallelism: Optional[int] = typer.Option(
        None, "--array-parallelism", min=1, help="slurm: jobs running at once."),
    config_file: Optional[Path] = CONFIG_OPTION,
) -> None:
    """Measure every cell of a suite, storing one record per cell as it finishes (resumable)."""
    config = load_cli_config(config_file, results_dir=results_dir, device=device, threads=threads, executor=executor,
                     workers=workers, timeout=timeout, gpus=gpus, partition=partition, slurm_time=slurm_time,
                     gpus_per_task=gpus_per_task, array_parallelism=array_parallelism)
    loaded = load_cli_suite(suite, config)
    with store_warnings():
        summary = _run(loaded, config, device, only, force, results_dir, dry_run)
    if summary is None:
        return
    where = f" -> {summary.results_file}" if summary.results_file else ""
    console.print(Text(
        f"{loaded.name}: {summary.ok + summary.errors} cells measured ({summary.errors} errors), "
        f"{summary.skipped} already stored, in {summary.duration_s:.1f} s{where}"),
        highlight=False,
    )
    if summary.errors:
        for message in summary.error_messages:
            err_console.print(f"[red]error:[/] {escape(message)}", highlight=False)
        raise typer.Exit(1)


def _run(loaded: Suite, config: Config, device: Optional[str], only: Optional[str], force: bool,
         results_dir: Optional[Path], dry_run: bool) -> RunSummary | None:
    """Plan (``dry_run``: print the plan and return None) or run the suite; errors end the command."""
    try:
        if dry_run:
            _print_plan(loaded, plan(loaded, config, device=device, only=only, force=force, results_dir=results_dir))
            return None
        if warning := interference_warning(list(loaded.metrics), config):
            warn(warning)
        with _RichObserver() as observer:
            return run_suite(loaded, config, device=device, only=only, force=force, results_dir=results_dir,
                             observer=observer)
    except (SuiteError, ValueError, ExecutorError) as error:
        fail(str(error))
    except StoreLockedError as error:
        fail(str(error), code=1)
    except RunInterrupted as interrupted:
        done = interrupted.summary
        err_console.print(
            f"[bold yellow]interrupted:[/] {done.ok + done.errors} cells stored in {escape(str(done.results_file))}; "
            "run the same command again to resume (stored cells are skipped).",
            highlight=False,
        )
        raise typer.Exit(130)


def _print_plan(suite: Suite, planned: list) -> None:
    table = Table(title=f"{suite.name}: {len(planned)} cells, metrics: {', '.join(suite.metrics)}")
    for column in ("#", "cell", "device", "config hash", "stored"):
        table.add_column(column)
    for index, item in enumerate(planned, start=1):
        table.add_row(str(index), escape(item.cell.label()), item.cell.device, item.cell.config_hash(),
                      "yes (skip)" if item.stored else "")
    console.print(table)


class _RichObserver:
    """A progress bar with the current cell and ETA, and one line per finished cell."""

    def __enter__(self) -> _RichObserver:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.progress.__enter__()
        self.task = self.progress.add_task("starting", total=None)
        self.label = ""
        return self

    def __exit__(self, *exc_info) -> None:
        self.progress.__exit__(*exc_info)

    def run_started(self, to_run: int, skipped: int) -> None:
        self.progress.update(self.task, total=to_run)
        if skipped:
            self.progress.console.print(f"{skipped} cells already stored (skipped; --force measures them again)")

    def cell_started(self, cell: Cell) -> None:
        self.label = cell.label()
        self.progress.update(self.task, description=escape(self.label))

    def cell_status(self, text: str) -> None:
        self.progress.update(self.task, description=escape(f"{self.label}: {text}"))

    def cell_finished(self, record: dict) -> None:
        if record["status"] == "ok":
            summary = "  ".join(f"{name}={format_value(name, r.get('value'))}" for name, r in record["metrics"].items())
            self.progress.console.print(f"[green]ok[/]    {escape(self.label)}  {escape(summary)}", highlight=False)
        else:
            self.progress.console.print(f"[red]error[/] {escape(self.label)}: {escape(record['error'])}",
                                        highlight=False)
        self.progress.advance(self.task)


@app.command("show")
def show_command(
    path: Path = typer.Argument(..., help="A results file or folder (results/quick)."),
    errors: bool = typer.Option(False, "--errors", help="Also print each failed cell's traceback."),
) -> None:
    """Print stored results as a table: configuration, status and each metric's headline."""
    with store_warnings():
        try:
            frame = load(path)
        except FileNotFoundError as error:
            fail(str(error))
    if frame.empty:
        fail(f"{path}: no records", code=1)
    console.print(_results_table(frame, str(path)))
    if errors:
        for _, row in frame[frame.status == "error"].iterrows():
            err_console.print(f"[red]{escape(str(row['model']))} {escape(str(row['op']))}[/]\n{row['traceback']}",
                              highlight=False)


def _results_table(frame: pd.DataFrame, title: str) -> Table:
    config_columns = [c for c in (*CELL_KEYS, *option_names()) if c in frame and _varies_or_key(frame, c)]
    metric_columns = [q.name for q in quantities() if "." not in q.name and q.name in frame]
    metric_columns += [c for c in frame.columns if c not in metric_columns and _is_other_headline(frame, c)]
    table = Table(title=f"{escape(title)}: {len(frame)} records")
    for column in (*config_columns, "status", *metric_columns, "threads", "commit"):
        table.add_column(column, justify="right" if column in metric_columns else "left")
    for _, row in frame.iterrows():
        cells = [_plain(row[c]) for c in config_columns]
        cells.append("ok" if row["status"] == "ok" else f"[red]error[/] {escape(str(row['error']))[:60]}")
        cells += [_metric_cell(row, c) for c in metric_columns]
        cells += [_plain(row.get("env.threads")), str(row.get("env.git_commit") or "-")[:8]]
        table.add_row(*cells)
    return table


def _varies_or_key(frame: pd.DataFrame, column: str) -> bool:
    """Always show model and op; other settings only where they differ between records."""
    return column in ("model", "op") or frame[column].astype(str).nunique(dropna=False) > 1


def _is_other_headline(frame: pd.DataFrame, column: str) -> bool:
    """Headline columns of metrics no registered metric declares (an old record's): named like a metric, no dot."""
    known = {"suite", "run_id", "config_hash", "status", "error", "traceback", "started", "duration_s",
             *CELL_KEYS, *option_names()}
    return "." not in column and column not in known


def _metric_cell(row: pd.Series, column: str) -> str:
    value = row[column]
    if not isinstance(value, (int, float)) or pd.isna(value):
        return "-"
    text = escape(format_value(column, value))
    spread = row.get("latency.iqr_s")
    if column == "latency" and isinstance(spread, (int, float)) and not pd.isna(spread):
        text = f"{value * 1e3:.2f} ± {spread * 1e3:.2f} ms"
    if column == "latency" and row.get("latency.noisy") is True:
        text += " [yellow](noisy)[/]"
    return text


def _plain(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return escape(f"{value:g}" if isinstance(value, float) else str(value))


@app.command("config")
def config_command(
    results_dir: Optional[Path] = RESULTS_DIR_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    threads: Optional[int] = THREADS_OPTION,
    config_file: Optional[Path] = CONFIG_OPTION,
) -> None:
    """Print the effective settings and where each came from (default, drbench.toml, or a flag)."""
    config = load_cli_config(config_file, results_dir=results_dir, device=device, threads=threads)
    table = Table(title="drbench settings")
    table.add_column("setting", no_wrap=True)
    table.add_column("value")
    table.add_column("source", overflow="fold")
    for key, value, source in config.items():
        table.add_row(key, escape(repr(value) if isinstance(value, str) else str(value)), escape(source))
    console.print(table)


@list_app.command("suites")
def list_suites_command(config_file: Optional[Path] = CONFIG_OPTION) -> None:
    """List the suite files in paths.suites_dir with their cell counts."""
    config = load_cli_config(config_file)
    directory = Path(config.get("paths.suites_dir"))
    table = Table(title=f"Suites in {escape(str(directory))}/")
    for column in ("name", "file", "cells", "metrics", "description"):
        table.add_column(column)
    for path in list_suites(directory):
        try:
            suite = load_suite(path, config)
        except SuiteError as error:
            table.add_row(escape(path.stem), escape(str(path)), "-", "-", f"[red]invalid:[/] {escape(str(error))}")
            continue
        table.add_row(suite.name, escape(str(path)), str(len(suite.cells)), ", ".join(suite.metrics),
                      escape(suite.description))
    console.print(table)
