"""Options and argument handling that several commands share: one definition each.

Each helper turns a user error into :func:`drbench.cli.app.fail` (one line on stderr, exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from drbench.cli.app import fail
from drbench.config import Config, ConfigError, load_config
from drbench.suite import MAX_OPTION_VALUE, Suite, SuiteError, load_suite

CONFIG_OPTION = typer.Option(None, "--config", help="Settings file (default: ./drbench.toml when present).")
RESULTS_DIR_OPTION = typer.Option(None, "--results-dir", help="Results folder (default: paths.results_dir).")
DEVICE_OPTION = typer.Option(None, "--device", help="cpu, cuda or auto (default: the suite's, else run.device).")
THREADS_OPTION = typer.Option(None, "--threads", min=0, help="torch threads (default: run.threads; 0: torch's).")
EXECUTOR_FLAGS = {"executor": "executor.name", "workers": "executor.workers", "timeout": "executor.timeout_s",
                  "gpus": "executor.gpus", "partition": "slurm.partition", "slurm_time": "slurm.time_min",
                  "gpus_per_task": "slurm.gpus_per_task", "array_parallelism": "slurm.array_parallelism"}


def load_cli_config(path: Optional[Path], **flags: Any) -> Config:
    """drbench.toml (or ``path``) with the command's flags on top: ``results_dir``, ``device``, ``threads`` and
    those of :data:`EXECUTOR_FLAGS`; a flag left at None keeps the file's value."""
    results_dir = flags.get("results_dir")
    overrides = {"paths.results_dir": str(results_dir) if results_dir else None, "run.device": flags.get("device"),
                 "run.threads": flags.get("threads")}
    overrides.update({key: flags.get(flag) for flag, key in EXECUTOR_FLAGS.items()})
    try:
        return load_config(path, overrides)
    except ConfigError as error:
        fail(str(error))


def load_cli_suite(argument: str, config: Config) -> Suite:
    """``argument`` is a suite file, or the name of one in ``paths.suites_dir`` (``quick``)."""
    path = Path(argument)
    if not path.exists():
        named = Path(config.get("paths.suites_dir")) / f"{argument}.yaml"
        path = named if named.exists() else path
    try:
        return load_suite(path, config)
    except SuiteError as error:
        fail(str(error))


OPTION_OWNERS = {"regions": "drconv", "experts": "condconv"}
"""Operator options that have their own flag, and the operator each belongs to."""


OPTION_FLAG = "--option"


def op_options(op: str, pairs: Optional[list[str]] = None, **given: Optional[int]) -> dict[str, Any]:
    """The operator options given on the command line: the dedicated flags (``regions``, ``experts``) and
    ``--option KEY=VALUE`` pairs (``init=independent``, ``guide_bias=true``; the value read as a YAML scalar). A
    flag of another operator, a malformed pair, or a size beyond what a suite may ask for
    (:data:`drbench.suite.MAX_OPTION_VALUE`) is an error; an option the operator does not take fails when the model
    is built.

    >>> op_options("drconv", ["init=independent", "guide_bias=true"], regions=4)
    {'regions': 4, 'init': 'independent', 'guide_bias': True}
    """
    options: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    for pair in pairs or []:
        key, equals, text = pair.partition("=")
        value = yaml.safe_load(text) if equals and key.isidentifier() else None
        if not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"{OPTION_FLAG} {pair!r}: expected KEY=VALUE with a plain value, e.g. init=independent")
        options[key] = value
    for name, value in options.items():
        if name not in OPTION_OWNERS:
            continue
        if OPTION_OWNERS[name] != op:
            raise ValueError(f"--{name} applies to --op {OPTION_OWNERS[name]}, not --op {op}")
        if value > MAX_OPTION_VALUE:
            raise ValueError(f"--{name} {value}: expected at most {MAX_OPTION_VALUE} (the operator's size grows "
                             "with it)")
    return options
