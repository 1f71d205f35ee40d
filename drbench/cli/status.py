"""``drbench status RESULTS_DIR [--suite S]``: done / running / failed / pending cells of a suite."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from drbench.cli.app import app, console, fail, store_warnings
from drbench.cli.options import CONFIG_OPTION, DEVICE_OPTION, load_cli_config, load_cli_suite
from drbench.config import Config
from drbench.executors import ExecutorError
from drbench.status import StatusReport, suite_status
from drbench.suite import Suite

_STYLES = {"done": "green", "running": "cyan", "failed": "red", "pending": "yellow"}


@app.command("status")
def status_command(
    results_dir: Path = typer.Argument(..., help="Results folder (results), or one suite's folder in it."),
    suite: Optional[str] = typer.Option(
        None, "--suite", help="Suite file or name; default: each suite folder in RESULTS_DIR, by its name."),
    device: Optional[str] = DEVICE_OPTION,
    show_all: bool = typer.Option(False, "--all", help="Also list the done cells."),
    config_file: Optional[Path] = CONFIG_OPTION,
) -> None:
    """Show which cells of a suite are done, running (claimed by a live worker), failed (with errors) or pending."""
    config = load_cli_config(config_file, device=device)
    if not results_dir.is_dir():
        fail(f"{results_dir}: no such results folder")
    suites = [load_cli_suite(suite, config)] if suite else _suites_in(results_dir, config)
    with store_warnings():
        try:
            reports = [suite_status(results_dir, loaded, config, device=device) for loaded in suites]
        except (ValueError, ExecutorError) as error:
            fail(str(error))
    for report in reports:
        _print_report(report, show_all)


def _suites_in(results_dir: Path, config: Config) -> list[Suite]:
    """The suites whose folders ``results_dir`` holds (or whose folder it is), found by name in suites_dir."""
    folders = [results_dir] if any(results_dir.glob("*.jsonl")) else sorted(
        folder for folder in results_dir.iterdir() if folder.is_dir() and any(folder.glob("*.jsonl"))
    )
    if not folders:
        fail(f"{results_dir}: no results here; give the folder that holds <suite>/ or a suite's folder")
    suites_dir = Path(config.get("paths.suites_dir"))
    for folder in folders:
        if not (suites_dir / f"{folder.name}.yaml").is_file():
            fail(f"no suite file {suites_dir}/{folder.name}.yaml for the results in {folder}; pass --suite FILE")
    return [load_cli_suite(folder.name, config) for folder in folders]


def _print_report(report: StatusReport, show_all: bool) -> None:
    counts = ", ".join(f"[{_STYLES[state]}]{count} {state}[/]" for state, count in report.counts.items())
    running = f"; in use by {escape(report.run)}" if report.run else ""
    console.print(f"[bold]{escape(report.suite)}[/] ({escape(str(report.directory))}): {len(report.cells)} cells: "
                  f"{counts}{running}", highlight=False, soft_wrap=True)
    shown = [cell for cell in report.cells if show_all or cell.state != "done"]
    if not shown:
        return
    table = Table(show_header=True, header_style="bold")
    for column in ("state", "cell", "details"):
        table.add_column(column, overflow="fold")
    for cell in sorted(shown, key=lambda c: ("running", "failed", "pending", "done").index(c.state)):
        if cell.claim is not None:
            details = f"{cell.claim.executor} executor, {cell.claim.where}, since {cell.claim.started}"
        else:
            details = cell.error or cell.note or ""
        table.add_row(f"[{_STYLES[cell.state]}]{cell.state}[/]", escape(cell.label), escape(details))
    console.print(table)
