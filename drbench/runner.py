"""Runs a suite: every cell measured in matrix order, each record stored the moment its cell finishes.

- A cell whose model cannot be built or whose metric raises (an operator that does not fit, out of memory) is
  stored as an ``error`` record with the message and traceback; the matrix goes on.
- Resume: a cell is skipped when the store already holds a successful record of it with the same configuration,
  metric settings, git commit, machine and thread count (``force=True`` measures it again). Failed cells are
  always retried.
- Ctrl-C: records are fsync'ed as they are written and SIGINT is held back while one is written, so an interrupt
  loses at most the cell in flight; :class:`RunInterrupted` says how many cells were stored and where.
- Executors: ``[executor]`` of the config (``--executor``, ``--workers``, ...) says where cells are measured:
  in this process (``local``, the default, in matrix order), in worker processes or as SLURM jobs (records then
  arrive in completion order); see :mod:`drbench.executors`. Whatever the executor, this process alone writes the
  run's results file.
- Device: ``device`` (the ``--device`` flag) wins over the suite's cell setting, which wins over drbench.toml's
  ``run.device``; ``auto`` means CUDA when available (for cells measured entirely as SLURM jobs: when the jobs get
  GPUs). Threads: ``run.threads`` of the config (0: torch's default),
  fixed with ``torch.set_num_threads`` for the whole run and recorded in every record.

>>> from drbench.config import load_config
>>> from drbench.suite import parse_suite
>>> config = load_config()
>>> suite = parse_suite("{name: tiny, fixed: {model: mobilenetv1, width: 0.25, input_size: 16}, metrics: [macs]}")
>>> summary = run_suite(suite, config, device="cpu", results_dir="results")
>>> summary.ok, summary.skipped, summary.results_file.parent
(1, 0, PosixPath('results/tiny'))
>>> run_suite(suite, config, device="cpu", results_dir="results").skipped      # resumed: measured once
1
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch

from drbench.config import Config
from drbench.environment import capture_environment
from drbench.executors import Dispatch, PartOutcome, job_device
from drbench.measure.timing import fixed_threads
from drbench.record import SCHEMA_VERSION
from drbench.results import ResultsStore, new_run_id, resume_key
from drbench.suite import Cell, Suite, matches, parse_filter


class RunObserver(Protocol):
    """Hooks for presenting a run (the CLI's progress bar); every method is optional to act upon."""

    def run_started(self, to_run: int, skipped: int) -> None: ...

    def cell_started(self, cell: Cell) -> None: ...

    def cell_status(self, text: str) -> None: ...

    def cell_finished(self, record: dict) -> None: ...


class _SilentObserver:
    def run_started(self, to_run: int, skipped: int) -> None:
        pass

    def cell_started(self, cell: Cell) -> None:
        pass

    def cell_status(self, text: str) -> None:
        pass

    def cell_finished(self, record: dict) -> None:
        pass


@dataclass(frozen=True)
class PlannedCell:
    """A cell of the run with its device resolved, and whether a stored record makes it skippable."""

    cell: Cell
    stored: bool


@dataclass
class RunSummary:
    suite: str
    results_file: Path | None
    planned: int
    skipped: int
    ok: int = 0
    errors: int = 0
    duration_s: float = 0.0
    error_messages: list[str] = field(default_factory=list)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``summary`` counts what was stored before it."""

    def __init__(self, summary: RunSummary) -> None:
        super().__init__(f"interrupted after storing {summary.ok + summary.errors} cells")
        self.summary = summary


def resolve_device(requested: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is available, else ``cpu``; asking for an absent GPU is an error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but torch sees no CUDA device; use --device cpu")
    return requested


def plan(
    suite: Suite,
    config: Config,
    *,
    device: str | None = None,
    only: str | None = None,
    force: bool = False,
    results_dir: str | Path | None = None,
) -> list[PlannedCell]:
    """The cells a run would measure, in order, each marked ``stored`` when resume would skip it."""
    rule = parse_filter(only) if only else None
    cells = []
    for cell in suite.cells:
        chosen = device or (cell.device if cell.device != "auto" else config.get("run.device"))
        resolved = cell.with_device(job_device(chosen, list(suite.metrics), config) or resolve_device(chosen))
        if rule is None or matches(resolved.config(), rule):
            cells.append(resolved)
    done = set() if force else _store(suite, config, results_dir).completed()
    with fixed_threads(config.get("run.threads")):
        return [PlannedCell(cell, resume_key(_skeleton(suite, cell)) in done) for cell in cells]


def run_suite(
    suite: Suite,
    config: Config,
    *,
    device: str | None = None,
    only: str | None = None,
    force: bool = False,
    results_dir: str | Path | None = None,
    observer: RunObserver | None = None,
) -> RunSummary:
    """Measure every planned cell that is not already stored; see the module docstring."""
    observer = observer or _SilentObserver()
    if only:
        parse_filter(only)  # a bad filter is refused before the store folder and its lock are created
    store = _store(suite, config, results_dir)
    with store.lock(), fixed_threads(config.get("run.threads")) as threads:
        planned = plan(suite, config, device=device, only=only, force=force, results_dir=results_dir)
        to_run = [p.cell for p in planned if not p.stored]
        summary = RunSummary(suite.name, None, len(planned), len(planned) - len(to_run))
        observer.run_started(len(to_run), summary.skipped)
        if not to_run:
            return summary
        dispatch = Dispatch(to_run, suite.metrics, config, threads=threads, suite_dir=store.directory,
                            job_name=f"drbench-{suite.name}")
        start = time.perf_counter()
        run_id = new_run_id()
        with store.writer(run_id) as writer, contextlib.closing(dispatch.run(observer)) as finished:
            summary.results_file = writer.path
            try:
                for index, parts in finished:
                    cell = to_run[index]
                    record = record_from_parts(suite, cell, parts, run_id)
                    with _sigint_deferred():
                        writer.append(record)
                    _count(summary, record, cell)
                    observer.cell_finished(record)
            except KeyboardInterrupt:
                summary.duration_s = time.perf_counter() - start
                raise RunInterrupted(summary) from None
        summary.duration_s = time.perf_counter() - start
    return summary


def record_from_parts(suite: Suite, cell: Cell, parts: Sequence[PartOutcome], run_id: str = "") -> dict:
    """The record of ``cell`` from its measured parts (one per executor; status ``error`` if any part failed).

    ``env`` is the first part's (where it ran; the run's own when that worker died before describing itself),
    ``execution`` says where each part ran, and the first failed part's message is the record's ``error``.
    """
    first = parts[0]
    record = _skeleton(suite, cell, run_id, started=first.started, env=first.env)
    measured = {name: result for part in parts for name, result in part.metrics.items()}
    record["metrics"] = {name: measured[name] for name in suite.metrics if name in measured}
    failed = [part for part in parts if part.error is not None]
    if failed:
        record.update(status="error", error=failed[0].error,
                      traceback="\n".join(part.traceback for part in failed if part.traceback) or None)
    record["duration_s"] = sum(part.duration_s for part in parts)
    record["execution"] = [part.execution() for part in parts]
    return record


def _skeleton(suite: Suite, cell: Cell, run_id: str = "", started: str | None = None, env: dict | None = None
              ) -> dict:
    """A record before measurement: everything resume compares is already in it (``env``: this process's
    unless given)."""
    return {
        "schema": SCHEMA_VERSION,
        "suite": suite.name,
        "run_id": run_id,
        "config": cell.config(),
        "config_hash": cell.config_hash(),
        "metric_settings": {name: settings.model_dump() for name, settings in suite.metrics.items()},
        "status": "ok",
        "error": None,
        "traceback": None,
        "metrics": {},
        "env": env if env is not None else _local_environment(cell),
        "started": started,
        "duration_s": None,
    }


def _local_environment(cell: Cell) -> dict:
    """This process's environment for ``cell``: for resume keys (commit, machine, threads) and for records whose
    worker died before describing its own. A CUDA cell planned on a machine without CUDA (a cluster's login
    node) is described on the CPU."""
    device = cell.torch_device
    return capture_environment(device if device.type != "cuda" or torch.cuda.is_available() else "cpu")


def _store(suite: Suite, config: Config, results_dir: str | Path | None) -> ResultsStore:
    return ResultsStore(Path(results_dir or config.get("paths.results_dir")) / suite.name)


def _count(summary: RunSummary, record: dict, cell: Cell) -> None:
    if record["status"] == "ok":
        summary.ok += 1
    else:
        summary.errors += 1
        summary.error_messages.append(f"{cell.label()}: {record['error']}")


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT back while a record is written, then deliver it: a record is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
