"""Executors: where ``drbench run`` measures a suite's cells.

- ``local`` (default): in the run's own process, one cell after another (:mod:`drbench.executors.local`).
- ``process``: in worker processes, ``--workers N`` at once, a per-cell ``--timeout``, ``--gpus 0,1`` pinning one
  worker per GPU; a crash, hang or OOM is that cell's error (:mod:`drbench.executors.process`).
- ``slurm``: as SLURM job-array tasks through submitit (:mod:`drbench.executors.slurm`).

The choice comes from ``[executor]`` in drbench.toml or the flags (:mod:`drbench.executors.settings`). A metric
can go to an executor of its own (``[executor] metrics = {accuracy = "slurm"}``: latency timed here, training
spread out): each cell is then measured in *parts*, one per executor, and its record is stored once every part is
back; a failed part makes the cell an error (the other parts' metrics are kept in the record).

Whatever the executor, the run's own process is the only writer of its results file, and the suite folder's lock
keeps a second run out; workers report back and claim the cell they measure (:mod:`drbench.executors.claims`),
which is what ``drbench status`` shows as running. Each record says where its parts ran (``execution``: executor,
metrics, hostname, pid, CUDA_VISIBLE_DEVICES, SLURM job id, start, duration) and stores as ``env.machine`` the
machine identity of the run that launched it, so that resume skips a cell measured on the cluster when the suite
is run again from the same machine (``env.hostname`` says where it really ran).

>>> from drbench.config import load_config
>>> config = load_config(overrides={"executor.name": "process", "executor.metrics": {"latency": "local"}})
>>> route_metrics(["macs", "params", "latency"], config.section("executor"))
{'process': ('macs', 'params'), 'local': ('latency',)}
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from pydantic import BaseModel

from drbench.config import Config
from drbench.environment import machine_id
from drbench.executors.base import (
    CellObserver,
    Executor,
    ExecutorError,
    PartOutcome,
    PartTask,
    measure_part,
    run_parts,
)
from drbench.executors.claims import CLAIMS_FOLDER
from drbench.executors.local import LocalExecutor
from drbench.executors.process import ProcessExecutor
from drbench.executors.settings import EXECUTOR_NAMES, ExecutorSettings, SlurmSettings
from drbench.executors.slurm import SlurmExecutor
from drbench.metric_registry import get_metric, list_metrics
from drbench.suite import Cell

TIMED_METRICS = ("latency",)
"""Metrics whose values suffer when other work shares the machine."""


def route_metrics(metric_names: Sequence[str], settings: ExecutorSettings) -> dict[str, tuple[str, ...]]:
    """Executor name -> the metrics it measures, in the order the metrics are named."""
    unknown = sorted(set(settings.metrics) - set(list_metrics()))
    if unknown:
        raise ExecutorError(f"executor.metrics names unknown metric {unknown[0]!r}; expected one of: "
                            f"{', '.join(list_metrics())}")
    routes: dict[str, list[str]] = {}
    for name in metric_names:
        routes.setdefault(settings.metrics.get(name, settings.name), []).append(name)
    return {executor: tuple(names) for executor, names in routes.items()}


def create_executor(name: str, config: Config, suite_dir: Path, job_name: str) -> Executor:
    """The executor ``name`` with its settings from ``config``; ``suite_dir`` holds the SLURM job folders."""
    if name not in _FACTORIES:
        raise ExecutorError(f"unknown executor {name!r}; expected one of: {', '.join(EXECUTOR_NAMES)}")
    return _FACTORIES[name](config, suite_dir, job_name)


def _process(config: Config, suite_dir: Path, job_name: str) -> Executor:
    settings: ExecutorSettings = config.section("executor")
    return ProcessExecutor(settings.workers, settings.timeout_s, settings.gpus)


def _slurm(config: Config, suite_dir: Path, job_name: str) -> Executor:
    settings: SlurmSettings = config.section("slurm")
    folder = Path(settings.folder) if settings.folder else suite_dir / ".submitit" / "%j"
    return SlurmExecutor(settings, folder, job_name)


_FACTORIES: dict[str, Callable[[Config, Path, str], Executor]] = {
    "local": lambda config, suite_dir, job_name: LocalExecutor(),
    "process": _process,
    "slurm": _slurm,
}


def interference_warning(metric_names: Sequence[str], config: Config) -> str | None:
    """A warning when timed metrics would be measured by several workers sharing this machine at once."""
    settings: ExecutorSettings = config.section("executor")
    workers = len(settings.gpus) or settings.workers or 1
    timed = [name for name in route_metrics(metric_names, settings).get("process", ()) if name in TIMED_METRICS]
    if not timed or workers < 2:
        return None
    return (f"{', '.join(timed)} measured by {workers} worker processes at once on this machine: their timings "
            "interfere; for clean timings use one worker or route them to the local executor "
            "([executor] metrics = {latency = \"local\"} in drbench.toml)")


def job_device(requested: str, metric_names: Sequence[str], config: Config) -> str | None:
    """The device of cells measured entirely as SLURM jobs, which this machine (a login node without GPUs) cannot
    check: ``auto`` means ``cuda`` when the jobs get GPUs (``slurm.gpus_per_task``), else ``cpu``. None when some
    metric is measured elsewhere: the device is then resolved here, as usual."""
    if set(route_metrics(metric_names, config.section("executor"))) != {"slurm"}:
        return None
    if requested == "auto":
        return "cuda" if config.section("slurm").gpus_per_task > 0 else "cpu"
    return requested


class Dispatch:
    """A run's cells split into parts (one per executor their metrics go to), ready to measure.

    Construction checks everything that can be checked before measuring (executor settings, metrics a worker
    can import, cells a worker can run) and raises :class:`ExecutorError`; :meth:`run` then yields each cell's
    parts as soon as all of them are back.

    >>> from drbench.config import load_config
    >>> from drbench.suite import load_suite
    >>> suite = load_suite("suites/quick.yaml")
    >>> cells = [cell.with_device("cpu") for cell in suite.cells[:1]]
    >>> dispatch = Dispatch(cells, {"params": suite.metrics["params"]}, load_config(), threads=1,
    ...                     suite_dir=Path("results/quick"))
    >>> class Observer:  # the CLI's draws a progress bar
    ...     def cell_started(self, cell): print("measuring", cell.label())
    ...     def cell_status(self, text): pass
    >>> for index, parts in dispatch.run(Observer()):
    ...     print(index, [(part.executor, part.metrics) for part in parts])
    measuring shufflenetv2 0.5x conv 32px b2 small_input=True num_classes=10
    0 [('local', {'params': {'value': 352042}})]
    """

    def __init__(self, cells: Sequence[Cell], metrics: Mapping[str, BaseModel], config: Config, *, threads: int,
                 suite_dir: Path, job_name: str = "drbench") -> None:
        routes = route_metrics(list(metrics), config.section("executor"))
        machine, claims = machine_id(), suite_dir / CLAIMS_FOLDER
        self.executors = list(routes)
        self.assignments: list[tuple[Executor, list[PartTask]]] = []
        for name, metric_names in routes.items():
            modules = _metric_modules(metric_names, name)
            part_metrics = {metric: metrics[metric] for metric in metric_names}
            tasks = [PartTask(index, name, cell, part_metrics, config, threads, machine, claims, modules)
                     for index, cell in enumerate(cells)]
            executor = create_executor(name, config, suite_dir, job_name)
            executor.check(tasks)
            self.assignments.append((executor, tasks))

    def run(self, observer: CellObserver) -> Iterator[tuple[int, list[PartOutcome]]]:
        """``(cell index, its parts in executor order)`` as each cell completes; closing the generator stops
        every executor."""
        waiting: dict[int, dict[str, PartOutcome]] = {}
        for outcome in run_parts(self.assignments, observer):
            parts = waiting.setdefault(outcome.index, {})
            parts[outcome.executor] = outcome
            if len(parts) == len(self.executors):
                del waiting[outcome.index]
                yield outcome.index, [parts[name] for name in self.executors]


def _metric_modules(metric_names: Sequence[str], executor: str) -> tuple[str, ...]:
    """The modules a worker imports so that these metrics are registered there."""
    modules = tuple(sorted({get_metric(name).function.__module__ for name in metric_names}))
    if executor != "local" and "__main__" in modules:
        defined = [name for name in metric_names if get_metric(name).function.__module__ == "__main__"]
        raise ExecutorError(f"metric {defined[0]!r} is defined in the __main__ script, which a {executor} worker "
                            "cannot import; define it in an importable module")
    return modules


__all__ = [
    "Dispatch",
    "EXECUTOR_NAMES",
    "Executor",
    "ExecutorError",
    "ExecutorSettings",
    "LocalExecutor",
    "PartOutcome",
    "PartTask",
    "ProcessExecutor",
    "SlurmExecutor",
    "SlurmSettings",
    "create_executor",
    "interference_warning",
    "job_device",
    "measure_part",
    "route_metrics",
]
