"""What every executor shares: the unit of work (a *part*), measuring it, and the executor interface.

A part is some or all of one cell's metrics, measured by one executor: one part per cell normally, two when
drbench.toml sends some metrics elsewhere (``[executor] metrics = {accuracy = "slurm"}``). :func:`measure_part`
is what runs where the executor puts it (this process, a worker process, a SLURM job): it claims the cell
(:mod:`drbench.executors.claims`), measures, and returns a :class:`PartOutcome`; a metric that raises becomes the
outcome's error. When the worker itself dies (crash, kill, timeout), the executor makes the error outcome with
:func:`failed_part`. Only the run that owns the results store turns outcomes into records and writes them.

An :class:`Executor` is driven by :func:`run_parts` from the run's own thread: ``start`` hands it its parts,
``poll`` returns the outcomes finished since the last call, ``close`` stops what is still running.
"""

from __future__ import annotations

import importlib
import os
import socket
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Protocol, Sequence

import torch
from pydantic import BaseModel

from drbench.config import Config
from drbench.environment import capture_environment
from drbench.executors.claims import release_claim, write_claim
from drbench.measure.timing import fixed_threads
from drbench.metric_registry import RunContext, measure_cell
from drbench.suite import Cell

POLL_INTERVAL_S = 0.5


class ExecutorError(RuntimeError):
    """An executor cannot run at all (bad settings, a worker that cannot start, submitit missing)."""


class CellObserver(Protocol):
    """The part of the runner's observer that executors call (see :class:`drbench.runner.RunObserver`)."""

    def cell_started(self, cell: Cell) -> None: ...

    def cell_status(self, text: str) -> None: ...


@dataclass(frozen=True)
class PartTask:
    """Everything a worker needs to measure part of a cell; picklable, so it travels to processes and jobs.

    ``modules`` are imported by the worker first: the modules that register the part's metrics.
    ``machine`` is the run's machine identity, stored as ``env.machine`` so that resume recognises the cell
    wherever it was measured. ``claims`` is the folder of claim files (None: do not claim).
    """

    index: int
    executor: str
    cell: Cell
    metrics: Mapping[str, BaseModel]
    config: Config
    threads: int
    machine: str
    claims: Path | None
    modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class PartOutcome:
    """The result of one part: metric results, or the error that stopped it, and where it ran.

    ``env`` is None when the worker died before it could describe itself.
    """

    index: int
    executor: str
    metric_names: tuple[str, ...]
    metrics: dict[str, dict]
    error: str | None
    traceback: str | None
    env: dict[str, Any] | None
    started: str
    duration_s: float
    worker: dict[str, Any] = field(default_factory=dict)

    def execution(self) -> dict[str, Any]:
        """The record's account of this part: executor, metrics, where it ran and for how long."""
        return {"executor": self.executor, "metrics": list(self.metric_names), **self.worker,
                "started": self.started, "duration_s": self.duration_s}


def measure_part(task: PartTask, status: Callable[[str], None] = lambda text: None) -> PartOutcome:
    """Measure ``task``'s metrics on its cell, here; a metric that raises gives an error outcome."""
    for module in task.modules:
        importlib.import_module(module)
    started, start = utc_now(), time.perf_counter()
    cell = task.cell
    if task.claims is not None:
        write_claim(task.claims, cell.config_hash(), task.executor, cell.label())
    try:
        with fixed_threads(task.threads) as threads:
            metrics, error, trace = {}, None, None
            try:
                metrics = measure_cell(cell, task.metrics, RunContext(task.config, threads, status))
            except Exception as failure:  # noqa: BLE001  (any failure of one cell is that cell's result)
                error, trace = f"{type(failure).__name__}: {failure}", traceback.format_exc()
                if cell.torch_device.type == "cuda":
                    torch.cuda.empty_cache()
            env = {**capture_environment(cell.torch_device), "machine": task.machine}
    finally:
        if task.claims is not None:
            release_claim(task.claims, cell.config_hash(), task.executor)
    return PartOutcome(task.index, task.executor, tuple(task.metrics), metrics, error, trace, env, started,
                       time.perf_counter() - start, worker_description())


def failed_part(task: PartTask, error: str, started: str, duration_s: float, worker: dict[str, Any] | None = None,
                trace: str | None = None) -> PartOutcome:
    """The outcome of a part whose worker died or was stopped (it could not release its claim: we do).

    ``duration_s`` is the time until the failure was noticed; ``worker`` what is known of the worker."""
    if task.claims is not None:
        release_claim(task.claims, task.cell.config_hash(), task.executor)
    known = {**dict.fromkeys(WORKER_KEYS), **(worker or {})}
    return PartOutcome(task.index, task.executor, tuple(task.metrics), {}, error, trace, None, started, duration_s,
                       known)


WORKER_KEYS = ("hostname", "pid", "cuda_visible_devices", "slurm_job_id")


def worker_description(pid: int | None = None, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Where a worker runs (:data:`WORKER_KEYS`): host, pid, the GPUs it may see, its SLURM job (default: this
    process)."""
    values = (socket.gethostname(), os.getpid() if pid is None else pid, environ.get("CUDA_VISIBLE_DEVICES"),
              environ.get("SLURM_JOB_ID"))
    return dict(zip(WORKER_KEYS, values))


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Executor(ABC):
    """Measures parts somewhere; driven by :func:`run_parts` (see the module docstring).

    ``blocking`` executors measure in ``poll`` itself (the local one): the others are polled without waiting
    while a blocking one still has work.
    """

    name: ClassVar[str]
    blocking: ClassVar[bool] = False

    def check(self, tasks: Sequence[PartTask]) -> None:
        """Raise :class:`ExecutorError` if these parts cannot run here (called before the run starts)."""

    @abstractmethod
    def start(self, tasks: Sequence[PartTask], observer: CellObserver) -> None:
        """Take these parts (called once, before any poll)."""

    @abstractmethod
    def poll(self, wait_s: float) -> list[PartOutcome]:
        """Outcomes finished since the last call; waits up to ``wait_s`` when none is ready yet."""

    @property
    @abstractmethod
    def unfinished(self) -> int:
        """Parts started or queued whose outcome ``poll`` has not returned yet."""

    @abstractmethod
    def close(self) -> None:
        """Stop whatever is still running (kill workers, cancel jobs); called on completion and on Ctrl-C."""


def run_parts(assignments: Sequence[tuple[Executor, Sequence[PartTask]]], observer: CellObserver
              ) -> Iterator[PartOutcome]:
    """Run each executor's parts, all executors at once, yielding outcomes as they finish.

    Closing the generator (Ctrl-C, an error) closes every executor, so no worker outlives the run.
    """
    started: list[Executor] = []
    try:
        for executor, tasks in assignments:
            executor.start(tasks, observer)
            started.append(executor)
        while busy := [executor for executor in started if executor.unfinished]:
            wait_s = 0.0 if any(executor.blocking for executor in busy) else POLL_INTERVAL_S / len(busy)
            for executor in busy:
                yield from executor.poll(wait_s)
    finally:
        for executor in started:
            executor.close()
