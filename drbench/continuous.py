"""Measure two commits on this machine, interleaved, and compare them: what ``asv continuous`` does, for drbench.

:func:`run_continuous` checks each commit out into a git worktree of its own (the user's checkout, its index and
its working tree are never touched; uncommitted changes in it are not measured, and the result says so), then
measures the suite's cells round by round: in each round every cell at the base commit and at the head commit,
one after the other, each in a fresh ``drbench run`` process, the order of the two commits swapped every other
round so that neither always runs second. Every record is stored in the results folder with its commit, as
``drbench run`` stores it, and the two commits' records are compared with :func:`drbench.compare.compare` (its
decision rules; rounds of a cell are replicates and pool).

How a commit's code runs: the process is this environment's Python interpreter (``sys.executable -P -m
drbench``) with the commit's worktree first on ``PYTHONPATH``, so ``import drbench`` imports that commit's sources
(and its C++ kernels, which torch's extension loader builds once per distinct source and caches); the
dependencies (torch, numpy, ...) are this environment's, whatever each commit's ``pyproject.toml`` asks for. Each
process runs in the current directory (``drbench.toml`` and relative paths mean what they mean here) with the
same results folder, thread count and device. The suite is read once, here, and each cell is handed to both
commits as a one-cell suite file (its configuration under ``fixed``, the suite's ``metrics`` section as written),
so that both measure the same cells whatever their own ``suites/`` hold.

Resume: a cell of a commit with ``k`` successful records on this machine at this thread count (clean checkout)
is measured in rounds ``k + 1 ... rounds`` only, whatever metric settings those records were measured with (a
commit may resolve the suite's defaults its own way, so they are not compared); a second call with the same
arguments measures nothing and prints the comparison again. In Python (``drbench continuous HEAD~1 HEAD --suite
quick --only op=conv``)::

    result = run_continuous("HEAD~1", "HEAD", load_suite("suites/quick.yaml"), load_config(), only="op=conv")
    result.comparison.regressed      # the regressed rows; len(result.measured): the processes this call ran
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import yaml

from drbench.compare import Comparison, compare
from drbench.config import Config
from drbench.environment import machine_id, run_git
from drbench.measure.timing import fixed_threads
from drbench.record import is_commit
from drbench.results import read_records
from drbench.runner import plan
from drbench.safe_yaml import load_yaml
from drbench.sides import Side, commit_of
from drbench.stats import DEFAULT_THRESHOLD
from drbench.suite import Cell, Suite, SuiteError, parse_suite

DEFAULT_ROUNDS = 3
"""Rounds per cell and commit: each round is one fresh process per side, so between-process differences (memory
layout, the allocator's state) show up as spread instead of being taken for the code's effect."""

OUTPUT_TAIL = 2000
"""Characters of a failed process's output quoted in the error."""


class ContinuousError(ValueError):
    """Bad input: a ref git does not know, a repository that is not one, a suite that cannot be handed over."""


class MeasurementError(RuntimeError):
    """A commit's process could not measure a cell (it stored no record); the message quotes its output."""


@dataclass(frozen=True)
class Revision:
    """A commit to measure: ``spec`` as the user gave it (``HEAD~1``) and the full hash git resolved it to."""

    spec: str
    commit: str

    @property
    def label(self) -> str:
        short = self.commit[:7]
        return short if self.commit.startswith(self.spec.lower()) else f"{short} ({self.spec})"


@dataclass(frozen=True)
class Job:
    """One fresh process: ``cell`` measured at ``revision`` in round ``round`` (from 0)."""

    round: int
    cell: Cell
    revision: Revision


@dataclass(frozen=True)
class JobOutcome:
    """How a job's process ended: its exit code (1: the cell failed and its error is stored), time and output."""

    job: Job
    returncode: int
    duration_s: float
    output: str


@dataclass(frozen=True)
class ContinuousResult:
    """The comparison of the two commits' records, and the jobs this call ran (resumed ones are not run)."""

    comparison: Comparison
    measured: tuple[JobOutcome, ...]
    skipped: int


class ContinuousObserver(Protocol):
    """Hooks for presenting progress (the CLI prints one line per job on stderr)."""

    def planned(self, jobs: Sequence[Job], skipped: int) -> None: ...

    def job_finished(self, index: int, outcome: JobOutcome) -> None: ...


class _SilentObserver:
    def planned(self, jobs: Sequence[Job], skipped: int) -> None:
        pass

    def job_finished(self, index: int, outcome: JobOutcome) -> None:
        pass


Measure = Callable[[Job, Path, Path], JobOutcome]
"""``measure(job, suite_file, worktree)`` measures the job's one-cell suite with the worktree's code."""


# Pure parts: which commits, which jobs, what each process is given ------------------------------------------------


def resolve_revision(spec: str, repo: str | Path) -> Revision:
    """``spec`` (a commit, branch, tag or ``HEAD~1``) as git resolves it in ``repo``; ContinuousError otherwise."""
    commit = commit_of(spec, repo)
    if commit is None or not is_commit(commit):
        raise ContinuousError(f"{spec!r} is not a commit of the git repository {repo}")
    return Revision(spec, commit)


def repository_root(directory: str | Path) -> Path:
    """The top of the git checkout holding ``directory``; ContinuousError outside one."""
    try:
        return Path(run_git("rev-parse", "--show-toplevel", repo=directory))
    except (OSError, subprocess.SubprocessError):
        raise ContinuousError(f"{directory} is not in a git checkout; run drbench continuous in the checkout whose "
                              "commits it measures, or give --repo") from None


def comparable_records(records: Iterable[Mapping[str, Any]], suite: str, machine: str, threads: int
                       ) -> list[Mapping[str, Any]]:
    """The records of ``suite`` measured on ``machine`` at ``threads`` threads from a clean checkout of a commit:
    the ones a comparison on this machine may use (ok or failed)."""
    return [r for r in records if r.get("suite") == suite and r["env"].get("git_commit")
            and not r["env"].get("git_dirty") and r["env"].get("machine") == machine
            and r["env"].get("threads") == threads]


def runs_per_cell(records: Iterable[Mapping[str, Any]], *, successful: bool = True) -> Counter:
    """(config hash, commit) -> how many of ``records`` measured it (``successful``: only ok ones)."""
    return Counter((r["config_hash"], r["env"]["git_commit"]) for r in records
                   if r.get("status") == "ok" or not successful)


def interleaved_jobs(cells: Sequence[Cell], revisions: Sequence[Revision], rounds: int,
                     stored: Mapping[tuple[str, str], int]) -> list[Job]:
    """Round by round, cell by cell, each revision in turn (the order reversed every other round); a cell and
    commit with ``k`` stored runs skips rounds ``0 .. k - 1``.

    >>> a, b = Revision("main", "a" * 40), Revision("HEAD", "b" * 40)
    >>> cell = Cell(model="mobilenetv1", width=0.25, device="cpu")
    >>> [(job.round, job.revision.spec) for job in interleaved_jobs([cell], [a, b], 3, {})]
    [(0, 'main'), (0, 'HEAD'), (1, 'HEAD'), (1, 'main'), (2, 'main'), (2, 'HEAD')]
    >>> len(interleaved_jobs([cell], [a, b], 3, {(cell.config_hash(), "a" * 40): 2}))
    4
    """
    jobs = []
    for round_index in range(rounds):
        order = revisions if round_index % 2 == 0 else list(reversed(revisions))
        for cell in cells:
            jobs += [Job(round_index, cell, revision) for revision in order
                     if stored.get((cell.config_hash(), revision.commit), 0) <= round_index]
    return jobs


def cell_suite(suite_name: str, cell: Cell, metrics: Any, config: Config) -> str:
    """A suite file of ``cell`` alone (its configuration under ``fixed``) with the metrics section ``metrics`` as
    the suite wrote it; ContinuousError if drbench would not read it back as the same cell."""
    text = yaml.safe_dump({"name": suite_name, "fixed": cell.config(), "metrics": metrics}, sort_keys=False)
    try:
        cells = parse_suite(text, f"{suite_name} ({cell.label()})", config).cells
    except SuiteError as error:
        raise ContinuousError(f"cell {cell.label()} cannot be written as a suite of its own: {error}") from None
    if [c.config_hash() for c in cells] != [cell.config_hash()]:
        raise ContinuousError(f"cell {cell.label()} does not read back as itself from a suite of its own")
    return text


def metrics_section(suite: Suite) -> Any:
    """The suite file's ``metrics`` section as written: each commit resolves the defaults its own way."""
    if suite.path is None:
        raise ContinuousError(f"suite {suite.name} was not read from a file; drbench continuous needs the file")
    try:
        data, _ = load_yaml(Path(suite.path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ContinuousError(f"{suite.path}: cannot read the suite again ({error})") from None
    return data.get("metrics")


def run_command(suite_file: Path, results_dir: Path, threads: int, device: str, config_file: Path | None
                ) -> list[str]:
    """The ``drbench run`` of one job: this interpreter, ``-P`` so that the current directory (perhaps a
    checkout of drbench itself) does not come before the worktree on the import path, and ``--force`` because
    which rounds are missing is decided here."""
    command = [sys.executable, "-P", "-m", "drbench", "run", str(suite_file), "--results-dir", str(results_dir),
               "--threads", str(threads), "--device", device, "--executor", "local", "--force"]
    return command + (["--config", str(config_file.resolve())] if config_file is not None else [])


def worktree_environment(worktree: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with ``worktree`` first on ``PYTHONPATH``: the process imports that commit's drbench."""
    paths = [str(worktree), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**environ, "PYTHONPATH": os.pathsep.join(paths)}


# Effects: worktrees, processes, the store -------------------------------------------------------------------------


@contextlib.contextmanager
def worktrees(repo: Path, revisions: Sequence[Revision], parent: Path) -> Iterator[dict[str, Path]]:
    """Each revision's commit checked out (detached) into a worktree under ``parent``; removed afterwards."""
    made: dict[str, Path] = {}
    try:
        for revision in revisions:
            if revision.commit not in made:
                path = parent / revision.commit[:12]
                run_git("worktree", "add", "--detach", "--quiet", str(path), revision.commit, repo=repo)
                made[revision.commit] = path
        yield made
    finally:
        for path in made.values():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                run_git("worktree", "remove", "--force", str(path), repo=repo)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            run_git("worktree", "prune", repo=repo)


def measure_in_process(results_dir: Path, threads: int, config_file: Path | None) -> Measure:
    """The default :data:`Measure`: ``drbench run`` of the one-cell suite with the worktree's code."""

    def measure(job: Job, suite_file: Path, worktree: Path) -> JobOutcome:
        start = time.perf_counter()
        finished = subprocess.run(run_command(suite_file, results_dir, threads, job.cell.device, config_file),
                                  env=worktree_environment(worktree, os.environ), capture_output=True, text=True)
        return JobOutcome(job, finished.returncode, time.perf_counter() - start, finished.stdout + finished.stderr)

    return measure


def run_continuous(
    baseline: str,
    current: str,
    suite: Suite,
    config: Config,
    *,
    only: str | None = None,
    rounds: int = DEFAULT_ROUNDS,
    device: str | None = None,
    repo: str | Path | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    metrics: Sequence[str] | None = None,
    observer: ContinuousObserver | None = None,
    measure: Measure | None = None,
) -> ContinuousResult:
    """Measure ``suite``'s cells (``only``: those matching the filter) at the commits ``baseline`` and ``current``
    of ``repo`` (default: the checkout holding the current directory), ``rounds`` times each, interleaved, and
    compare them; see the module docstring. ``measure`` replaces the processes (tests)."""
    if rounds < 1:
        raise ContinuousError(f"--rounds {rounds}: expected at least 1")
    observer = observer or _SilentObserver()
    root = repository_root(repo if repo is not None else Path.cwd())
    revisions = [resolve_revision(spec, root) for spec in (baseline, current)]
    if revisions[0].commit == revisions[1].commit:
        raise ContinuousError(f"{baseline} and {current} are the same commit ({revisions[0].commit[:7]}): its records "
                              "would be both sides; measure its noise with drbench run twice and drbench compare")
    cells = [planned.cell for planned in plan(suite, config, device=device, only=only, force=True)]
    if not cells:
        raise ContinuousError(f"--only {only}: no cell of suite {suite.name} matches")
    suite_texts = {cell.config_hash(): cell_suite(suite.name, cell, metrics_section(suite), config) for cell in cells}
    results_dir = Path(config.get("paths.results_dir")).resolve()
    store = results_dir / suite.name
    threads, machine = recorded_threads(config.get("run.threads")), machine_id()

    def comparable() -> list[Mapping[str, Any]]:
        return comparable_records(read_records(store) if store.is_dir() else [], suite.name, machine, threads)

    jobs = interleaved_jobs(cells, revisions, rounds, runs_per_cell(comparable()))
    skipped = len(cells) * len(revisions) * rounds - len(jobs)
    observer.planned(jobs, skipped)
    measured = []
    if jobs:
        with tempfile.TemporaryDirectory(prefix="drbench-continuous-") as scratch:
            folder = Path(scratch)
            for key, text in suite_texts.items():
                (folder / f"{key}.yaml").write_text(text, encoding="utf-8")
            with worktrees(root, revisions, folder) as checked_out:
                measure = measure or measure_in_process(results_dir, threads, config.file)
                stored = runs_per_cell(comparable(), successful=False)
                for index, job in enumerate(jobs):
                    outcome = measure(job, folder / f"{job.cell.config_hash()}.yaml", checked_out[job.revision.commit])
                    stored = _check_stored(outcome, stored, runs_per_cell(comparable(), successful=False))
                    measured.append(outcome)
                    observer.job_finished(index, outcome)
    records, hashes = comparable(), {cell.config_hash() for cell in cells}
    sides = [Side(revision.spec, f"commit {revision.label} in {store}",
                  tuple(r for r in records if r["config_hash"] in hashes and r["env"]["git_commit"] == revision.commit))
             for revision in revisions]
    comparison = compare(*sides, threshold=threshold, metrics=metrics)
    notes = comparison.notes + _checkout_notes(root, revisions)
    return ContinuousResult(replace(comparison, notes=notes), tuple(measured), skipped)


def recorded_threads(requested: int) -> int:
    """The thread count a process of this interpreter records when asked for ``requested`` (0: torch's default)."""
    with fixed_threads(requested) as threads:
        return threads


def _check_stored(outcome: JobOutcome, before: Counter, after: Counter) -> Counter:
    """``after`` when the job's process stored its record (ok, or the cell's error: exit 1), else
    MeasurementError quoting the process's output."""
    job = outcome.job
    key = (job.cell.config_hash(), job.revision.commit)
    if outcome.returncode in (0, 1) and after[key] > before[key]:
        return after
    raise MeasurementError(
        f"measuring {job.cell.label()} at commit {job.revision.label} stored no record (exit code "
        f"{outcome.returncode}); its output ends:\n{outcome.output[-OUTPUT_TAIL:]}")


def _checkout_notes(root: Path, revisions: Sequence[Revision]) -> tuple[str, ...]:
    """What the reader must know about what was not measured: uncommitted changes in the user's checkout."""
    if not run_git("status", "--porcelain", "--untracked-files=no", repo=root):
        return ()
    return (f"{root} has uncommitted changes; they were not measured (each commit was checked out as committed: "
            f"{', '.join(revision.label for revision in revisions)})",)
