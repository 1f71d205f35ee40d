"""``drbench report RESULTS... [--out DIR]``: tables, plots, index.md and index.html from results stores."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from drbench.cli.app import app, console, fail, store_warnings, warn
from drbench.cli.options import CONFIG_OPTION
from drbench.config import ConfigError, load_config


@app.command("report")
def report_command(
    results: List[Path] = typer.Argument(..., help="Results files or folders (results/quick); several are merged."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: <paths.reports_dir>/<suite>)."),
    config_file: Optional[Path] = CONFIG_OPTION,
) -> None:
    """Write a report folder: index.md, index.html (opens from disk), CSV tables and PNG/SVG plots."""
    with store_warnings():
        try:
            from drbench.report import build_report  # matplotlib: imported only when a report is made

            report = build_report(results, out, config=load_config(config_file))
        except (ConfigError, FileNotFoundError, ValueError) as error:
            fail(str(error))
    for notice in report.notices:
        more = f" ({len(notice.details)} listed in the report)" if notice.details else ""
        warn(f"{notice.message.rstrip(':')}{more}")
    plots = len(report.plot_files) // 2
    console.print(Text(
        f"report: {report.index_html} and {report.index_md.name}, {len(report.csv_files)} CSV files, "
        f"{plots} plots (PNG and SVG){f', {len(report.mask_files)} mask images' if report.mask_files else ''}"),
        highlight=False,
    )
