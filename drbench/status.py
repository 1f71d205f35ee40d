"""Where a suite stands in a results folder: which cells are done, running, failed or still to measure.

Each cell of the suite (as ``drbench run`` would plan it: same device resolution, same resume rule) is in one state:

- ``running``: a live claim says a process is measuring it now (see :mod:`drbench.executors.claims`: a run holds
  the suite folder and the claimer is alive); ``claim`` says which process, where, and since when.
- ``done``: a successful record that resume accepts (same configuration, metric settings, commit, machine and
  threads) is stored; ``drbench run`` would skip it.
- ``failed``: the latest record of the cell is an error; ``error`` is its message (the next run retries it).
- ``pending``: none of the above; ``note`` says when a successful record exists that resume does not accept
  (another commit, machine or thread count).

>>> from drbench.suite import load_suite
>>> report = suite_status("results", load_suite("suites/quick.yaml"), device="cpu")
>>> report.counts                         # stored on other commits and another machine: to measure again here
{'done': 0, 'running': 0, 'failed': 0, 'pending': 6}
>>> report.of("pending")[0].note[:25]
'stored on commit 5e6f7a8b'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from drbench.config import Config, load_config
from drbench.executors.claims import CLAIMS_FOLDER, Claim, is_live, read_claims
from drbench.results import ResultsStore
from drbench.runner import plan
from drbench.suite import Suite

CellState = Literal["done", "running", "failed", "pending"]
STATES: tuple[CellState, ...] = ("done", "running", "failed", "pending")


@dataclass(frozen=True)
class CellStatus:
    """One cell's state, with the error (failed), the claim (running) or a note (pending) that explains it."""

    label: str
    config_hash: str
    state: CellState
    error: str | None = None
    claim: Claim | None = None
    note: str | None = None


@dataclass(frozen=True)
class StatusReport:
    """The state of every cell of ``suite`` in ``directory``; ``run`` names the run holding the folder now."""

    suite: str
    directory: Path
    cells: tuple[CellStatus, ...]
    run: str | None

    def of(self, state: CellState) -> list[CellStatus]:
        """The cells in ``state``, in matrix order."""
        return [cell for cell in self.cells if cell.state == state]

    @property
    def counts(self) -> dict[str, int]:
        return {state: len(self.of(state)) for state in STATES}


def suite_status(
    results_dir: str | Path, suite: Suite, config: Config | None = None, *, device: str | None = None
) -> StatusReport:
    """The state of each of ``suite``'s cells under ``results_dir`` (the folder holding ``<suite name>/``, or
    that suite folder itself); ``config`` and ``device`` as given to ``drbench run``."""
    config = config or load_config()
    root = suite_root(results_dir, suite.name)
    store = ResultsStore(root / suite.name)
    run = store.holder()
    claims = {claim.config_hash: claim for claim in read_claims(store.directory / CLAIMS_FOLDER)
              if is_live(claim, suite_locked=run is not None)}
    latest: dict[str, dict] = {}
    for record in store.records():  # files in time order, records in the order they were stored
        latest[record["config_hash"]] = record
    cells = []
    for item in plan(suite, config, device=device, results_dir=root):
        key = item.cell.config_hash()
        status = CellStatus(item.cell.label(), key, "pending")
        last = latest.get(key)
        if key in claims:
            status = CellStatus(status.label, key, "running", claim=claims[key])
        elif item.stored:
            status = CellStatus(status.label, key, "done")
        elif last is not None and last.get("status") == "error":
            status = CellStatus(status.label, key, "failed", error=last.get("error"))
        elif last is not None:
            env = last.get("env", {})
            status = CellStatus(status.label, key, "pending", note=(
                f"stored on commit {str(env.get('git_commit'))[:8]}, machine {env.get('machine')}, "
                f"{env.get('threads')} threads (resume needs the same commit, machine, threads and metric settings)"
            ))
        cells.append(status)
    return StatusReport(suite.name, store.directory, tuple(cells), run)


def suite_root(results_dir: str | Path, suite_name: str) -> Path:
    """The folder that holds ``<suite_name>/``: ``results_dir`` itself, unless it is that suite folder."""
    results_dir = Path(results_dir)
    if not (results_dir / suite_name).is_dir() and results_dir.name == suite_name:
        return results_dir.parent
    return results_dir
