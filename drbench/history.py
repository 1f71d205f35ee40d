"""A metric per cell across commits: the series in commit order, the step changes in it, and a plot.

Series: one per cell (suite and configuration hash) and environment (machine and thread count, which change the
figures without being part of a cell's identity). Points: the records of one series at one commit are pooled
(their raw latency samples together, or their seeds, or their values); a commit measured with uncommitted changes is
a separate point (``3db48f3+``) after the clean one, and records made outside git are one point per run.

Order: commits follow git's history (``git rev-list --topo-order``, oldest first) in the checkout holding drbench's
sources (or ``repo``); when git does not know every commit (results from another clone, a shallow checkout), the
points follow the time of their first record instead and :attr:`History.order` says why.

Step changes: a piecewise-constant fit by bottom-up merging with the comparison's own decision rule
(:mod:`drbench.compare`). Every point starts as its own segment; the two adjacent segments whose pooled
observations the rule finds unchanged, and closest in ratio, are merged, until every pair of neighbours differs.
The boundaries left are the steps. Pooling lets slow drifts accumulate into a detectable step, and a one-commit
spike that is later undone shows as two steps (up, then down), each at the commit that caused it.

>>> history = load_history("results", metric="latency", suite="quick")
>>> len(history.cells), [point.label for point in history.cells[0].points], history.steps
(6, ['1a2b3c4', '5e6f7a8'], [])
>>> plot_history(history, "reports/history-latency.png")
PosixPath('reports/history-latency.png')
"""

from __future__ import annotations

import math
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from drbench.compare_format import shorten_labels
from drbench.metric_registry import Quantity, quantity
from drbench.environment import run_git
from drbench.record import is_commit
from drbench.results import read_records
from drbench.sides import commit_label, record_time
from drbench.stats import DEFAULT_THRESHOLD, Decision, Verdict
from drbench.suite import label, matches, parse_filter

GIT_ORDER = "git history"


@dataclass(frozen=True)
class HistoryPoint:
    """One cell's observations at one commit (``label``: short hash, ``+`` when dirty) and when they were made."""

    commit: str | None
    label: str
    time: str
    observations: tuple[float, ...]


@dataclass(frozen=True)
class StepChange:
    """A level change that starts at point ``index`` (commit ``commit``), judged between the segments around it."""

    index: int
    commit: str
    before: float
    after: float
    decision: Decision


@dataclass(frozen=True)
class CellHistory:
    suite: str
    config_hash: str
    label: str
    points: tuple[HistoryPoint, ...]
    steps: tuple[StepChange, ...]


@dataclass(frozen=True)
class History:
    """Every selected cell's series of one metric; ``order`` says how the points were ordered."""

    metric: str
    threshold: float
    order: str
    cells: tuple[CellHistory, ...]

    @property
    def steps(self) -> list[tuple[CellHistory, StepChange]]:
        return [(cell, step) for cell in self.cells for step in cell.steps]


def load_history(path: str | Path, metric: str = "latency", *, suite: str | None = None, cell: str | None = None,
                 threshold: float = DEFAULT_THRESHOLD, repo: str | Path | None = None) -> History:
    """The history of ``metric`` in a results file or folder; ``cell`` filters cells like ``drbench run --only``
    (``op=drconv,width=0.5``); ``repo`` is the git checkout that orders the commits."""
    return build_history(read_records(path), metric, suite=suite, cell=cell, threshold=threshold, repo=repo)


def build_history(records: Iterable[Mapping[str, Any]], metric: str = "latency", *, suite: str | None = None,
                  cell: str | None = None, threshold: float = DEFAULT_THRESHOLD,
                  repo: str | Path | None = None) -> History:
    """:func:`load_history` on records already read. Raises ValueError when nothing is selected."""
    rule = quantity(metric)
    rule_filter = parse_filter(cell) if cell else None
    selected = [r for r in records if r.get("status") == "ok" and (suite is None or r.get("suite") == suite)
                and (rule_filter is None or matches(r.get("config", {}), rule_filter))
                and rule.observations(r.get("metrics", {})) is not None]
    if not selected:
        raise ValueError(f"no successful records with metric {metric!r} match "
                         f"suite={suite or 'any'}, cell={cell or 'any'}")
    positions = commit_positions({r["env"].get("git_commit") for r in selected} - {None}, repo)
    order = GIT_ORDER if positions is not None else "time of first record (git does not know every commit)"
    series: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for record in selected:
        env = record["env"]
        key = (record.get("suite") or "", record["config_hash"], str(env.get("machine")), str(env.get("threads")))
        series.setdefault(key, []).append(record)
    several_environments = len({key[2:] for key in series}) > 1
    cells = []
    for (suite_name, key, machine, threads), cell_records in sorted(series.items()):
        points = _points(cell_records, rule, positions)
        name = label(cell_records[0]["config"])
        if several_environments:
            name += f" threads={threads} machine={machine}"
        cells.append(CellHistory(suite_name, key, name, tuple(points), tuple(find_steps(points, rule, threshold))))
    return History(metric, threshold, order, tuple(cells))


def commit_positions(commits: set[str], repo: str | Path | None = None) -> dict[str, int] | None:
    """Each commit's position in git history, oldest first; None when git does not know all of them."""
    if not commits or not all(map(is_commit, commits)):  # a record's text never reaches git as an option
        return None
    try:
        listed = run_git("rev-list", "--topo-order", "--reverse", "--end-of-options", *sorted(commits),
                         repo=repo).split()
    except (OSError, subprocess.SubprocessError):
        return None
    positions = {commit: index for index, commit in enumerate(listed)}
    return positions if commits <= positions.keys() else None


def _points(records: Sequence[Mapping[str, Any]], rule: Quantity,
            positions: dict[str, int] | None) -> list[HistoryPoint]:
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in sorted(records, key=record_time):
        env = record.get("env", {})
        commit = env.get("git_commit")
        key = (commit, bool(env.get("git_dirty"))) if commit else (None, record.get("run_id"))
        groups.setdefault(key, []).append(record)
    points = []
    for (commit, _), group in groups.items():
        observations = tuple(v for record in group for v in rule.observations(record["metrics"]))
        label = commit_label(group[0]["env"]) if commit else str(group[0].get("run_id") or "unknown")[:16]
        points.append(HistoryPoint(commit, label, record_time(group[0])[0], observations))

    def position(point: HistoryPoint) -> tuple:
        dirty = point.label.endswith("+")
        if positions is not None:
            return positions.get(point.commit or "", math.inf), dirty, point.time
        return point.time, dirty

    return sorted(points, key=position)


def find_steps(points: Sequence[HistoryPoint], rule: Quantity, threshold: float) -> list[StepChange]:
    """Step changes of a series by bottom-up merging of segments with ``rule`` (see the module docstring)."""
    segments = [[point] for point in points]
    while len(segments) > 1:
        judged = [_judge(left, right, rule, threshold) for left, right in zip(segments, segments[1:])]
        mergeable = [(abs(math.log(d.ratio)), i) for i, d in enumerate(judged)
                     if d.verdict is Verdict.UNCHANGED and d.ratio is not None and d.ratio > 0]
        if not mergeable:
            break
        _, i = min(mergeable)
        segments[i:i + 2] = [segments[i] + segments[i + 1]]
    steps = []
    start = 0
    for left, right in zip(segments, segments[1:]):
        start += len(left)
        decision = _judge(left, right, rule, threshold)
        steps.append(StepChange(start, right[0].label, rule.centre(_pooled(left)), rule.centre(_pooled(right)),
                                decision))
    return steps


def _judge(left: list[HistoryPoint], right: list[HistoryPoint], rule: Quantity, threshold: float) -> Decision:
    return rule.judge(_pooled(left), _pooled(right), threshold)


def _pooled(segment: list[HistoryPoint]) -> list[float]:
    return [value for point in segment for value in point.observations]


def plot_history(history: History, out: str | Path) -> Path:
    """One panel per cell: the metric's centre per commit with its spread (quartiles of the samples, or one
    standard deviation of the seeds), the fitted segment levels, a dashed line at each step change labelled with
    its ratio. PNG, SVG or PDF
    by the file's suffix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    rule = quantity(history.metric)
    scale, unit = rule.scale, rule.unit
    columns = min(3, len(history.cells))
    rows = math.ceil(len(history.cells) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    common, short = shorten_labels(cell.label for cell in history.cells)
    for ax, cell in zip(axes.flat, history.cells):
        centres = [rule.centre(p.observations) * scale for p in cell.points]
        low, high = zip(*(_spread(p.observations, rule) for p in cell.points))
        errors = [[c - lo * scale for c, lo in zip(centres, low)], [hi * scale - c for c, hi in zip(centres, high)]]
        x = range(len(cell.points))
        ax.errorbar(x, centres, yerr=errors, marker="o", capsize=3, color="tab:blue")
        if cell.steps:  # the piecewise-constant fit: each segment's level
            edges = [0, *(step.index for step in cell.steps), len(cell.points)]
            levels = [cell.steps[0].before, *(step.after for step in cell.steps)]
            ax.hlines([level * scale for level in levels], [e - 0.4 for e in edges[:-1]],
                      [e - 0.6 for e in edges[1:]], color="tab:gray", linewidth=4, alpha=0.4)
        for step in cell.steps:
            colour = "tab:red" if step.decision.verdict is Verdict.REGRESSED else "tab:green"
            ax.axvline(step.index - 0.5, color=colour, linestyle="--")
            ax.annotate(f"{step.decision.ratio:.2f}x", (step.index - 0.5, 1.0), xycoords=("data", "axes fraction"),
                        ha="center", va="bottom", color=colour, fontsize=8)
        ax.set_xticks(list(x), [p.label for p in cell.points], rotation=45, ha="right", fontsize=7)
        ax.set_title(short[cell.label], fontsize=9, pad=14)
        ax.set_ylabel(f"{history.metric} ({unit})" if unit else history.metric)
        ax.set_xlabel(f"commit ({history.order})", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(history.cells):]:
        ax.set_visible(False)
    if common:
        figure.suptitle(common, fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def _spread(observations: Sequence[float], rule: Quantity) -> tuple[float, float]:
    if len(observations) < 2:
        return observations[0], observations[0]
    if rule.centre is statistics.fmean:
        mean, std = statistics.fmean(observations), statistics.stdev(observations)
        return mean - std, mean + std
    quartiles = statistics.quantiles(observations, n=4, method="inclusive")
    return quartiles[0], quartiles[2]

