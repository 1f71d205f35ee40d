"""``[executor]`` and ``[slurm]`` in drbench.toml: where ``drbench run`` measures a suite's cells.

::

    [executor]
    name = "process"                  # local (default) | process | slurm        (--executor)
    workers = 2                       # process: worker processes at once         (--workers)
    timeout_s = 600                   # process: per-cell limit, 0 = none         (--timeout)
    gpus = [0, 1]                     # process: one worker pinned to each GPU    (--gpus 0,1)
    metrics = { accuracy = "slurm" }  # per-metric executor: these metrics of every cell go there

    [slurm]                           # the slurm executor, through submitit
    partition = "gpu"                 # (--partition)
    time_min = 120                    # job time limit, minutes                   (--slurm-time)
    gpus_per_task = 1                 # (--gpus-per-task)
    array_parallelism = 32            # job-array tasks running at once           (--array-parallelism)
    setup = ["module load cuda"]      # shell lines the job runs before Python

Importing this module registers both sections (:func:`drbench.config.register_config_section`); the runner
imports it, so ``load_config`` knows them wherever suites are run.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from drbench.config import register_config_section

ExecutorName = Literal["local", "process", "slurm"]
EXECUTOR_NAMES: tuple[str, ...] = get_args(ExecutorName)


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ExecutorSettings(_Settings):
    """How ``drbench run`` hands cells out: in this process, to worker processes, or to SLURM jobs."""

    name: ExecutorName = Field("local", description="local: in this process; process: worker processes; "
                                                    "slurm: jobs submitted with submitit")
    workers: int | None = Field(None, ge=1, description="process: workers at once (default 1, or one per GPU)")
    timeout_s: float = Field(0, ge=0, description="process: a cell running longer is killed and recorded as an "
                                                  "error; 0: no limit")
    gpus: tuple[str, ...] = Field((), description="process: one worker per GPU, each seeing only its own "
                                                  "(CUDA_VISIBLE_DEVICES); indices or UUIDs")
    metrics: dict[str, ExecutorName] = Field(
        default_factory=dict, description="metric -> executor for metrics measured elsewhere than `name`"
    )

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_names(cls, value: Any) -> Any:
        """``[0, 1]`` in TOML, ``"0,1"`` from the command line: both become ``("0", "1")``."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            return tuple(str(gpu) if isinstance(gpu, int) and not isinstance(gpu, bool) else gpu for gpu in value)
        return value


class SlurmSettings(_Settings):
    """The jobs of the ``slurm`` executor (one job-array task per cell, submitted with submitit)."""

    cluster: Literal["slurm", "local", "debug"] = Field(
        "slurm", description="submitit's cluster: slurm, or local/debug to run the jobs on this machine (tests)"
    )
    folder: str = Field("", description="submitit's logs and pickles; empty: <results_dir>/<suite>/.submitit")
    partition: str = ""
    time_min: int = Field(60, ge=1, description="job time limit in minutes")
    gpus_per_task: int = Field(0, ge=0)
    cpus_per_task: int = Field(2, ge=1)
    mem_gb: float = Field(0, ge=0, description="0: the partition's default")
    array_parallelism: int = Field(16, ge=1, description="array tasks running at once")
    account: str = ""
    qos: str = ""
    constraint: str = ""
    setup: tuple[str, ...] = Field((), description="shell lines run before the job (module load, venv activate)")
    additional: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="any other sbatch option, e.g. {exclusive = true}"
    )

    @field_validator("setup", mode="before")
    @classmethod
    def _lines(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value


register_config_section("executor", ExecutorSettings)
register_config_section("slurm", SlurmSettings)
