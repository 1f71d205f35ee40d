"""Test-only metrics for the executor tests, in an importable module so that worker processes register them too.

``fault`` does to a worker what real cells sometimes do, on the cells its settings select (cell filters, as in a
suite's ``exclude``): exit at once (``os._exit``), segfault (a real one: reading address 0), or hang. The cells
that ``meet_on`` selects wait until ``meet_parties`` of them are being measured at once (a barrier of files in
``meet_dir``), which forces them onto different workers. Every cell that survives reports the worker's pid and
the GPUs the worker was given.

``claims`` reports, from inside a measurement, the live claims of the suite folder it is given: what
``drbench status`` would show as running at that moment.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

from drbench.executors.claims import CLAIMS_FOLDER, is_live, read_claims
from drbench.metric_registry import MetricSettings, RunContext, register_metric
from drbench.results import ResultsStore
from drbench.suite import Cell, matches

MEET_TIMEOUT_S = 300.0


class FaultSettings(MetricSettings):
    exit_on: dict[str, Any] = {}
    segfault_on: dict[str, Any] = {}
    hang_on: dict[str, Any] = {}
    meet_on: dict[str, Any] = {}
    meet_dir: str = ""
    meet_parties: int = 2


def _selected(cell: Cell, rule: dict[str, Any]) -> bool:
    return bool(rule) and matches(cell.config(), rule)


@register_metric("fault", settings=FaultSettings)
def measure_fault(cell: Cell, settings: FaultSettings, context: RunContext) -> dict:
    """Crash, segfault, hang or wait for company on the selected cells; report where the cell was measured."""
    if _selected(cell, settings.exit_on):
        os._exit(3)
    if _selected(cell, settings.segfault_on):
        ctypes.string_at(0)
    if _selected(cell, settings.hang_on):
        time.sleep(3600)
    if _selected(cell, settings.meet_on):
        _meet(Path(settings.meet_dir), settings.meet_parties)
    return {"value": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _meet(folder: Path, parties: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + MEET_TIMEOUT_S
    while len(list(folder.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(folder.iterdir()))} of {parties} parties met in {folder}")
        time.sleep(0.05)


class ClaimsSettings(MetricSettings):
    suite_dir: str


@register_metric("claims", settings=ClaimsSettings)
def measure_claims(cell: Cell, settings: ClaimsSettings, context: RunContext) -> dict:
    """The live claims of ``suite_dir`` while this cell is measured."""
    folder = Path(settings.suite_dir)
    locked = ResultsStore(folder).holder() is not None
    live = [claim for claim in read_claims(folder / CLAIMS_FOLDER) if is_live(claim, locked)]
    return {"value": len(live), "labels": [c.label for c in live], "pids": [c.pid for c in live],
            "executors": [c.executor for c in live]}
