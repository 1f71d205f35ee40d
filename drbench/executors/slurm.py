"""The ``slurm`` executor: one SLURM job-array task per part, submitted with submitit.

All parts are submitted at once with ``executor.map_array`` (one array, ``slurm.array_parallelism`` tasks running
at a time); each task runs :func:`drbench.executors.base.measure_part` on a compute node and submitit brings its
outcome back as a pickle in ``slurm.folder``. The run stays in the foreground, polls the jobs and stores each
record as its job ends; Ctrl-C cancels the jobs not yet finished (resume submits them again).

A job that fails outside the measurement (time limit, node failure, preemption, an import error on the node) is
recorded as that cell's error with submitit's message; its log is in the job folder.

Jobs run ``sys.executable`` of the submitting process on the compute nodes, so the virtual environment (and the
drbench checkout, for the git commit) must be on a shared file system; metrics registered outside drbench must
live in a module the nodes can import. ``slurm.cluster = "local"`` runs the same jobs as local subprocesses
(submitit's LocalExecutor), which is how the tests exercise this path without a cluster.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from drbench.executors.base import (
    CellObserver,
    Executor,
    ExecutorError,
    PartOutcome,
    PartTask,
    failed_part,
    measure_part,
    utc_now,
)
from drbench.executors.claims import release_claim
from drbench.executors.settings import SlurmSettings


class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(self, settings: SlurmSettings, folder: Path, job_name: str) -> None:
        try:
            import submitit  # noqa: F401  (an optional dependency: fail before anything is measured)
        except ImportError:
            raise ExecutorError("the slurm executor needs submitit: pip install submitit") from None
        self.settings = settings
        self.folder = folder
        self.job_name = job_name
        self._pending: list[tuple[PartTask, Any]] = []
        self._submitted = ""
        self._clock = 0.0

    def start(self, tasks: Sequence[PartTask], observer: CellObserver) -> None:
        import submitit

        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.settings.cluster)
        executor.update_parameters(**submitit_parameters(self.settings, self.job_name))
        jobs = executor.map_array(measure_part, tasks)
        self._submitted, self._clock = utc_now(), time.monotonic()
        self._pending = list(zip(tasks, jobs))
        for task in tasks:
            observer.cell_started(task.cell)

    def poll(self, wait_s: float) -> list[PartOutcome]:
        finished, waiting = [], []
        for task, job in self._pending:
            (finished if job.done() else waiting).append((task, job))
        self._pending = waiting
        if not finished:
            time.sleep(wait_s)
        return [self._outcome(task, job) for task, job in finished]

    @property
    def unfinished(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Cancel the jobs not finished yet."""
        for task, job in self._pending:
            job.cancel(check=False)
            if task.claims is not None:  # the job may have claimed its cell before it was cancelled
                release_claim(task.claims, task.cell.config_hash(), task.executor)
        self._pending = []

    def _outcome(self, task: PartTask, job: Any) -> PartOutcome:
        try:
            return job.result()
        except Exception as error:  # noqa: BLE001  (submitit's UncompletedJobError, FailedJobError, unpickling)
            message = next((line.strip() for line in str(error).splitlines() if line.strip()), "no message")
            return failed_part(task, f"JobFailed: job {job.job_id}: {message}", self._submitted,
                               time.monotonic() - self._clock, {"slurm_job_id": str(job.job_id)}, str(error))


def submitit_parameters(settings: SlurmSettings, job_name: str) -> dict[str, Any]:
    """``settings`` as ``AutoExecutor.update_parameters`` keywords: shared ones, and ``slurm_*`` ones that only
    the slurm cluster reads (submitit ignores them for ``local``)."""
    parameters: dict[str, Any] = {
        "name": job_name,
        "timeout_min": settings.time_min,
        "tasks_per_node": 1,
        "cpus_per_task": settings.cpus_per_task,
        "gpus_per_node": settings.gpus_per_task,  # one task per job: the GPUs of the node's task
    }
    if settings.mem_gb:
        parameters["mem_gb"] = settings.mem_gb
    slurm_only = {
        "partition": settings.partition,
        "account": settings.account,
        "qos": settings.qos,
        "constraint": settings.constraint,
        "setup": list(settings.setup),
        "additional_parameters": dict(settings.additional),
        "array_parallelism": settings.array_parallelism,
    }
    parameters.update({f"slurm_{key}": value for key, value in slurm_only.items() if value})
    return parameters
