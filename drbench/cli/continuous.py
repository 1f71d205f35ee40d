"""``drbench continuous BASE HEAD``: measure two commits here, interleaved, and compare them (drbench.continuous)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import typer
from rich.markup import escape

from drbench.cli.app import app, err_console, fail
from drbench.cli.compare import (
    FORMAT_OPTION, METRIC_OPTION, THRESHOLD_OPTION, OutputFormat, metric_names, present, user_errors,
)
from drbench.cli.options import CONFIG_OPTION, DEVICE_OPTION, RESULTS_DIR_OPTION, THREADS_OPTION, load_cli_config, \
    load_cli_suite
from drbench.compare import parse_threshold
from drbench.continuous import DEFAULT_ROUNDS, Job, JobOutcome, MeasurementError, run_continuous


@app.command("continuous")
def continuous_command(
    baseline: str = typer.Argument(..., help="The base commit (a hash, branch, tag or HEAD~1)."),
    current: str = typer.Argument(..., help="The commit to judge against it (HEAD, a branch, ...)."),
    suite: str = typer.Option(..., "--suite", help="Suite file (suites/quick.yaml) or suite name (quick)."),
    only: Optional[str] = typer.Option(
        None, "--only", help="Only matching cells: key=value[|value],... e.g. 'op=conv'."),
    rounds: int = typer.Option(DEFAULT_ROUNDS, "--rounds", min=1,
                               help="Fresh processes per cell and commit, interleaved."),
    threshold: str = THRESHOLD_OPTION,
    metric: Optional[str] = METRIC_OPTION,
    output: OutputFormat = FORMAT_OPTION,
    repo: Optional[Path] = typer.Option(
        None, "--repo", help="The git checkout whose commits are measured (default: the current directory's)."),
    results_dir: Optional[Path] = RESULTS_DIR_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    threads: Optional[int] = THREADS_OPTION,
    config_file: Optional[Path] = CONFIG_OPTION,
) -> None:
    """Measure a suite at two commits on this machine, cell by cell in turns, and compare them; exit 1 if anything
    regressed.

    Each commit is checked out into a git worktree of its own (your checkout is not touched) and imported by fresh
    processes of this environment's Python. Records are stored with their commits; a rerun resumes.
    """
    config = load_cli_config(config_file, results_dir=results_dir, device=device, threads=threads)
    loaded = load_cli_suite(suite, config)
    with user_errors():
        try:
            result = run_continuous(
                baseline, current, loaded, config, only=only, rounds=rounds, device=device, repo=repo,
                threshold=parse_threshold(threshold), metrics=metric_names(metric), observer=_ProgressLines(),
            )
        except MeasurementError as error:
            fail(str(error), code=1)
        except KeyboardInterrupt:
            fail("interrupted; the records stored so far are kept: run the same command again to resume", code=130)
    present(result.comparison, output)


class _ProgressLines:
    """One line per process on stderr (stdout holds the comparison alone: ``--format markdown > summary.md``)."""

    def planned(self, jobs: Sequence[Job], skipped: int) -> None:
        self.total = len(jobs)
        stored = f", {skipped} already stored" if skipped else ""
        err_console.print(f"{len(jobs)} processes to run{stored}", highlight=False)

    def job_finished(self, index: int, outcome: JobOutcome) -> None:
        job = outcome.job
        status = "ok" if outcome.returncode == 0 else "[red]cell failed[/]"
        err_console.print(f"[{index + 1}/{self.total}] round {job.round + 1}  {escape(job.cell.label())}  at "
                          f"{escape(job.revision.label)}: {status} ({outcome.duration_s:.1f} s)", highlight=False)
