"""What was measured, where and when, and what a reader must be warned about before trusting a report.

>>> from drbench.report.cells import load_results
>>> results = load_results(["results/quick"])
>>> provenance(results).as_items()[:2]
[('suite', 'quick'), ('commit', '5e6f7a8')]
>>> [notice.message for notice in report_warnings(results)]
[]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from drbench.report.cells import Results, is_missing
from drbench.stats import NOISY_REL_IQR

SHORT_COMMIT = 7


@dataclass(frozen=True)
class Notice:
    """A warning for the top of a report; ``details`` lists the cells or lines it is about."""

    message: str
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class Provenance:
    """The header of a report: each field lists the distinct values among the cells shown."""

    suites: tuple[str, ...]
    commits: tuple[str, ...]
    devices: tuple[str, ...]
    torch_versions: tuple[str, ...]
    threads: tuple[str, ...]
    machines: tuple[str, ...]
    measured: str
    records: int
    cells: int
    sources: tuple[str, ...]

    def as_items(self) -> list[tuple[str, str]]:
        """(label, text) pairs in reading order."""
        unknown = lambda values: ", ".join(values) or "unknown"  # noqa: E731
        return [
            ("suite", unknown(self.suites)),
            ("commit", unknown(self.commits)),
            ("device", unknown(self.devices)),
            ("torch", unknown(self.torch_versions)),
            ("threads", unknown(self.threads)),
            ("machine", unknown(self.machines)),
            ("measured", self.measured),
            ("cells", f"{self.cells} (the latest of {self.records} records, one per configuration)"),
            ("results", ", ".join(self.sources)),
        ]


def provenance(results: Results) -> Provenance:
    cells = results.cells
    times = sorted(str(t) for t in _column(cells, "env.time"))
    measured = f"{times[0]} to {times[-1]}" if len(times) > 1 and times[0] != times[-1] else (times or ["unknown"])[0]
    return Provenance(
        suites=tuple(results.suites),
        commits=tuple(_commits(cells)),
        devices=tuple(f"{d} ({n})" if n and n != d else str(d)
                      for d, n in dict.fromkeys(_pairs(cells, "env.device", "env.device_name"))),
        torch_versions=tuple(map(str, _distinct(cells, "env.torch_version"))),
        threads=tuple(str(int(t)) for t in _distinct(cells, "env.threads")),
        machines=tuple(map(str, _distinct(cells, "env.machine"))),
        measured=measured,
        records=len(results.records),
        cells=len(cells),
        sources=tuple(map(str, results.sources)),
    )


def report_warnings(results: Results) -> list[Notice]:
    """What a reader must see first: mixed commits or machines, uncommitted code, noisy, failed or diverged
    cells, unreadable lines."""
    cells, facts = results.cells, provenance(results)
    notices = [Notice("Skipped unreadable lines of the results:", results.unreadable)] if results.unreadable else []
    mixed = {"commits": facts.commits, "machines": facts.machines, "devices": facts.devices,
             "torch versions": facts.torch_versions, "thread counts": facts.threads}
    notices += [Notice(f"These results mix {len(values)} {what} ({', '.join(values)}): compare cells measured under "
                       "different conditions with care (drbench compare matches them pairwise).")
                for what, values in mixed.items() if len(values) > 1]
    if any(value is True for value in _column(cells, "env.git_dirty")):
        notices.append(Notice("Some cells were measured with uncommitted changes to tracked files: the commit alone "
                              "does not reproduce them."))
    if noisy := noisy_cells(results):
        measured = int(cells["latency_ms"].notna().sum())
        machine = all(cell.machine_noisy for cell in noisy)
        notices.append(Notice(
            f"Noisy latency (IQR/median above {NOISY_REL_IQR:.0%}, marked * in the tables) in {len(noisy)} of "
            f"{_count(measured, 'cell')}"
            + (": the reference kernel timed in turns with each was as noisy, so the machine was (other load, a "
               "virtual machine's neighbours), not the operator; measure again on a quieter machine or with a "
               "larger timing budget:" if machine else ":"),
            tuple(map(str, noisy))))
    if failed := failed_cells(results):
        notices.append(Notice(f"{_count(len(failed), 'cell')} failed; missing from the tables and plots:",
                              tuple(f"{label}: {error}" for label, error in failed)))
    if len(protocols := training_protocols(results)) > 1:
        notices.append(Notice(
            f"Accuracy was trained under {len(protocols)} different protocols: a row may compare operators trained "
            "differently (drbench report one protocol's results at a time to compare like with like):",
            tuple(f"{settings}: {', '.join(labels)}" for settings, labels in protocols)))
    if diverged := diverged_runs(results):
        notices.append(Notice("Training runs diverged (NaN loss) and are left out of the accuracy:",
                              tuple(f"{label}: {count} run(s)" for label, count in diverged)))
    return notices


@dataclass(frozen=True)
class NoisyCell:
    """A cell whose forward latency is noisy, and the spread of the reference kernel timed in turns with it."""

    label: str
    rel_iqr: float
    reference_rel_iqr: float

    @property
    def machine_noisy(self) -> bool:
        """The reference was noisy too: the machine's speed moved while the cell was timed."""
        return self.reference_rel_iqr > NOISY_REL_IQR

    def __str__(self) -> str:
        """
        >>> print(NoisyCell("conv", 0.15, 0.2))
        conv: IQR/median 15% (reference kernel beside it: 20%)
        """
        beside = "" if math.isnan(self.reference_rel_iqr) else \
            f" (reference kernel beside it: {self.reference_rel_iqr:.0%})"
        return f"{self.label}: IQR/median {self.rel_iqr:.0%}{beside}"


def noisy_cells(results: Results) -> list[NoisyCell]:
    """Each cell whose forward latency is noisy, with its reference's spread (NaN where none was timed)."""
    cells = results.cells
    noisy = cells[cells["latency_rel_iqr"] > NOISY_REL_IQR]
    return [NoisyCell(results.label(cell), float(cell["latency_rel_iqr"]), float(cell["reference_rel_iqr"]))
            for _, cell in noisy.iterrows()]


def diverged_runs(results: Results) -> list[tuple[str, int]]:
    """(label, diverged seed count) of each cell where accuracy training diverged."""
    counts = pd.to_numeric(results.cells.get("accuracy.diverged", pd.Series(dtype=float)), errors="coerce")
    return [(results.label(results.cells.loc[i]), int(n)) for i, n in counts.items() if n > 0]


def training_protocols(results: Results) -> list[tuple[str, tuple[str, ...]]]:
    """(the settings that tell it apart, the cells trained with it) for each accuracy protocol among the cells: the
    recipe its runs stored and the data set. A setting one protocol lacks (a record older than the setting) reads
    ``unset``; it is not named from today's defaults.

    >>> from drbench.report.cells import load_results
    >>> training_protocols(load_results(["results/quick"]))  # the quick store measured no accuracy
    []
    """
    protocols: dict[str, dict[str, Any]] = {}
    members: dict[str, list[str]] = {}
    for _, cell in results.cells.iterrows():
        settings = _protocol(cell.get("accuracy.runs"), cell.get("accuracy.dataset"))
        if settings is None:
            continue
        key = json.dumps(settings, sort_keys=True, default=str)
        protocols.setdefault(key, settings)
        members.setdefault(key, []).append(results.label(cell))
    names = sorted({name for settings in protocols.values() for name in settings})
    differing = [name for name in names if len({json.dumps(s.get(name, "unset"), default=str)
                                                for s in protocols.values()}) > 1]
    return [(", ".join(f"{name}={settings.get(name, 'unset')}" for name in differing) or "the same settings",
             tuple(members[key])) for key, settings in protocols.items()]


def _protocol(runs: Any, dataset: Any) -> dict[str, Any] | None:
    """The stored recipe of a cell's first run and its data set, flat; None without a recipe (not a stored run)."""
    recipe = next((run["recipe"] for run in runs if isinstance(run, dict) and isinstance(run.get("recipe"), dict)),
                  None) if isinstance(runs, list) else None
    if recipe is None:
        return None
    data = {f"dataset.{key}": value for key, value in dataset.items()} if isinstance(dataset, dict) else {}
    return {**recipe, **data}


def failed_cells(results: Results) -> list[tuple[str, str]]:
    """(label, error message) of each cell whose latest record is an error."""
    failed = results.cells[results.cells["status"] != "ok"]
    return [(results.label(cell), str(cell.get("error") or "no message"))
            for _, cell in failed.iterrows()]


def _commits(cells: pd.DataFrame) -> list[str]:
    """Each commit, short, marked when any of its cells ran with uncommitted changes."""
    dirty: dict[str, bool] = {}
    for commit, is_dirty in _pairs(cells, "env.git_commit", "env.git_dirty"):
        name = "unknown (not a git checkout)" if is_missing(commit) else str(commit)[:SHORT_COMMIT]
        dirty[name] = dirty.get(name, False) or is_dirty is True
    return [f"{name} (uncommitted changes)" if is_dirty else name for name, is_dirty in dirty.items()]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _column(frame: pd.DataFrame, name: str) -> list:
    return [v for v in frame[name] if not is_missing(v)] if name in frame else []


def _distinct(frame: pd.DataFrame, name: str) -> list:
    return list(dict.fromkeys(_column(frame, name)))


def _pairs(frame: pd.DataFrame, first: str, second: str) -> list[tuple]:
    if first not in frame:
        return []
    seconds = frame[second] if second in frame else [None] * len(frame)
    return [(a, None if is_missing(b) else b) for a, b in zip(frame[first], seconds)]
