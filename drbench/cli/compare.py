"""``drbench compare`` (two sets of results, cell by cell) and ``drbench history`` (a metric across commits)."""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from drbench.cli.app import app, console, fail, store_warnings
from drbench.cli.options import CONFIG_OPTION
from drbench.compare import Comparison, compare_results, parse_threshold
from drbench.compare_format import comparison_json, comparison_markdown, format_p, format_ratio, shorten_labels
from drbench.config import ConfigError, load_config
from drbench.history import History, load_history, plot_history
from drbench.metric_registry import format_value
from drbench.stats import Verdict

THRESHOLD_OPTION = typer.Option("10%", "--threshold", help="Smallest change that counts: 10% or 0.1.")
METRIC_OPTION = typer.Option(
    None, "--metric", help="Comma-separated metrics (latency,latency.train,macs,params,memory,accuracy); "
    "default: every metric measured.")
SUITE_OPTION = typer.Option(None, "--suite", help="Only records of this suite.")

_STYLES = {Verdict.REGRESSED: "bold red", Verdict.IMPROVED: "green", Verdict.UNCHANGED: "dim"}


class OutputFormat(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"


FORMAT_OPTION = typer.Option(OutputFormat.table, "--format", help="table, markdown or json.")


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input -> one line and exit 2; skipped store lines -> warnings on stderr."""
    with store_warnings():
        try:
            yield
        except (ValueError, FileNotFoundError) as error:  # CompareError, SuiteError, ConfigError among them
            fail(str(error))


def metric_names(option: Optional[str]) -> list[str] | None:
    """``--metric a,b`` as names; None (every metric) when not given."""
    return [name.strip() for name in option.split(",")] if option else None


def _results_dir(results_dir: Optional[Path], config_file: Optional[Path]) -> Path:
    try:
        return results_dir or Path(load_config(config_file).get("paths.results_dir"))
    except ConfigError as error:
        fail(str(error))


@app.command("compare")
def compare_command(
    baseline: str = typer.Argument(..., help="Results file or folder, or a git commit/ref with stored results."),
    current: str = typer.Argument(..., help="Results file or folder, or a git commit/ref with stored results."),
    threshold: str = THRESHOLD_OPTION,
    metric: Optional[str] = METRIC_OPTION,
    output: OutputFormat = FORMAT_OPTION,
    suite: Optional[str] = SUITE_OPTION,
    results_dir: Optional[Path] = typer.Option(
        None, "--results-dir", help="Store where commits are looked up (default: paths.results_dir)."
    ),
    config_file: Optional[Path] = CONFIG_OPTION,
) -> None:
    """Compare two sets of results cell by cell; exit 1 if anything regressed.

    Latency counts as changed only beyond the threshold and with Mann-Whitney U p < 0.002 on the raw samples;
    MACs and params on any change; accuracy when the seed means differ by more than twice their pooled spread.
    """
    with user_errors():
        comparison = compare_results(
            baseline, current, results_dir=_results_dir(results_dir, config_file), suite=suite,
            threshold=parse_threshold(threshold), metrics=metric_names(metric),
        )
    present(comparison, output)


def present(comparison: Comparison, output: OutputFormat) -> None:
    """Print ``comparison`` on stdout in ``output``'s format; exit 1 when anything regressed."""
    if output is OutputFormat.json:
        print(comparison_json(comparison))
    elif output is OutputFormat.markdown:
        print(comparison_markdown(comparison), end="")
    else:
        _print_comparison(comparison)
    if comparison.regressed:
        raise typer.Exit(1)


def _print_comparison(comparison: Comparison) -> None:
    console.print(f"[bold]baseline:[/] {escape(comparison.baseline.source)}  "
                  f"({', '.join(comparison.baseline.commits())})", highlight=False)
    console.print(f"[bold]current:[/]  {escape(comparison.current.source)}  "
                  f"({', '.join(comparison.current.commits())})", highlight=False)
    for difference in comparison.environment_differences:
        console.print(f"[bold yellow]environments differ:[/] {escape(difference)}", highlight=False)
    for note in comparison.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    common, short = shorten_labels(row.label for row in comparison.cells)
    table = Table(title=comparison.headline(), caption=f"every cell: {escape(common)}" if common else None)
    for column in ("cell", "metric", "baseline", "current", "ratio", "p", "result", "rule"):
        table.add_column(column, justify="right" if column in ("baseline", "current", "ratio", "p") else "left")
    for row in comparison.ordered():
        table.add_row(
            escape(short[row.label]), escape(row.metric), format_value(row.metric, row.baseline),
            format_value(row.metric, row.current), format_ratio(row.ratio), format_p(row.p_value),
            f"[{_STYLES.get(row.verdict, 'yellow')}]{row.verdict.value}[/]", escape(row.rule),
        )
    console.print(table)


@app.command("history")
def history_command(
    results: Path = typer.Argument(..., help="A results folder or file (results, results/quick)."),
    suite: Optional[str] = SUITE_OPTION,
    metric: str = typer.Option("latency", "--metric", help="latency, latency.train, macs, params, memory, ..."),
    cell: Optional[str] = typer.Option(
        None, "--cell", help="Only matching cells: key=value[|value],... e.g. 'op=drconv,width=0.5'."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Plot file, .png/.svg/.pdf (default: <reports_dir>/history-<metric>.png)."
    ),
    threshold: str = THRESHOLD_OPTION,
    config_file: Optional[Path] = CONFIG_OPTION,
) -> None:
    """Plot a metric per cell across commits (in git order), mark the step changes and print them."""
    with user_errors():
        history = load_history(results, metric, suite=suite, cell=cell, threshold=parse_threshold(threshold))
        target = out or Path(load_config(config_file).get("paths.reports_dir")) / f"history-{metric}.png"
    _print_history(history)
    console.print(Text(f"plot: {plot_history(history, target)}"), highlight=False)


def _print_history(history: History) -> None:
    commits = {point.label for cell in history.cells for point in cell.points}
    console.print(f"{len(history.cells)} cells over {len(commits)} commits, ordered by {history.order}",
                  highlight=False)
    if not history.steps:
        console.print(f"no step changes in {history.metric} beyond {history.threshold:.0%}")
        return
    common, short = shorten_labels(cell.label for cell, _ in history.steps)
    table = Table(title=f"Step changes in {escape(history.metric)}",
                  caption=f"every cell: {escape(common)}" if common else None)
    for column in ("cell", "at commit", "before", "after", "ratio", "p", "result"):
        table.add_column(column, justify="right" if column in ("before", "after", "ratio", "p") else "left")
    for cell, step in history.steps:
        verdict = step.decision.verdict
        table.add_row(escape(short[cell.label]), step.commit, format_value(history.metric, step.before),
                      format_value(history.metric, step.after), format_ratio(step.decision.ratio),
                      format_p(step.decision.p_value), f"[{_STYLES.get(verdict, 'yellow')}]{verdict.value}[/]")
    console.print(table)
