"""Compare two sets of results cell by cell, with decision rules that measurement noise does not fool.

Each side is a results file or folder, or a git commit (or ref) whose records are in the results store. Cells are
matched by their configuration hash; the environment (threads, host, device, library versions) is not part of a
cell's identity, and :attr:`Comparison.environment_differences` says where the two sides' environments differ.

>>> comparison = compare_results("results/quick", "HEAD", results_dir="results")      # doctest: +SKIP
>>> comparison.regressed                                                                 # doctest: +SKIP
()
>>> print(comparison.to_markdown())                                                      # doctest: +SKIP

Decision rules, one small pure function per kind of metric (``ratio`` is current / baseline; "beyond the
threshold" ``t`` means ``ratio > 1 + t`` or ``ratio < 1 / (1 + t)``, symmetric in log scale):

- ``latency`` (raw samples, :func:`decide_samples`): a change counts when the ratio of medians is beyond the
  threshold AND the samples differ statistically: a two-sided Mann-Whitney U test gives ``p < 0.002`` (asv's
  rule). Where every run on both sides timed drbench's reference kernel in turns with the cell
  (:func:`drbench.measure.timing.time_with_reference`) and the torch versions agree, the rule judges the
  *relative* samples (each over the reference kernel's sample of its round), and the ratio shown is theirs: a
  shared machine that runs slower for a while slows both alike, and no test on the samples of one run could see
  that drift between runs. Otherwise the raw samples are judged and the rule says so. With few samples the test
  cannot reach p < 0.002: the smallest two-sided p of n and m untied samples is
  ``2 / C(n + m, n)`` (0.0079 for 5 vs 5, 0.0022 for 6 vs 6). Then, while that smallest p is at most 0.01, the
  change counts only if the two samples do not overlap at all (every sample of one side beyond every sample of the
  other: the widest distribution-free confidence interval of each median, asv's fallback); with fewer samples
  still (3 vs 3: smallest p 0.1) nothing counts and the rule says the samples are too few.
- ``macs``, ``params`` (deterministic, :func:`decide_exact`): any change counts.
- ``memory`` and metrics drbench does not know (one figure per run, :func:`decide_threshold`): a change beyond the
  threshold counts (allocator and workspace choices move memory a little between runs on a GPU).
- ``accuracy`` (one figure per seed, higher is better, :func:`decide_seeds`): a change counts when the difference
  of the seed means exceeds twice the pooled standard deviation of the seeds (``sqrt((s_b^2 + s_c^2) / 2)``, the
  sides with at least two seeds); the threshold does not apply, and Welch's t-test p-value is reported beside it.
  Identical seeds on both sides (a deterministic trainer) make any difference count; with a single seed per side
  the spread is unknown and the threshold rule applies.

Several runs of a cell on one side (``drbench run --force`` again, or a folder holding several run files) are
replicates: their observations are pooled, so between-run drift widens the spread the test sees. A cell with no
successful run on one side and one on the other counts as a regression (fails now) or an improvement (failed
before); a cell measured on one side only is reported as such and is not a regression.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence


from drbench.environment import run_git
from drbench.measure.timing import LatencyMeasurement
from drbench.results import read_records
from drbench.suite import Cell
from drbench.textsafe import markdown_code, markdown_text

P_THRESHOLD = 0.002
"""Mann-Whitney U p-value below which two latency samples count as different (asv's choice)."""

FALLBACK_MAX_P = 0.01
"""With too few samples for the test to reach P_THRESHOLD, non-overlapping samples still count while the smallest
achievable p is at most this; below it nothing counts."""

SEED_SPREADS = 2.0
"""Accuracy: a difference of means beyond this many pooled standard deviations counts."""

DEFAULT_THRESHOLD = 0.10

ENVIRONMENT_KEYS = ("threads", "machine", "device_name", "cpu_model", "torch_version", "cuda_version",
                    "cudnn_benchmark", "python_version", "region_conv_impl")
"""Environment fields whose difference between the two sides the comparison reports."""

METRIC_UNITS: dict[str, tuple[float, str]] = {
    "latency": (1e3, "ms"),
    "latency.train": (1e3, "ms"),
    "macs": (1e-6, "M"),
    "params": (1e-6, "M"),
    "memory": (2.0**-20, "MiB"),
    "accuracy": (1.0, "%"),
}
"""How each metric's stored value (seconds, counts, bytes, percent) is shown: a scale and a unit."""


class CompareError(ValueError):
    """A side that cannot be resolved or a metric that is not there; the message says what was expected."""


class Verdict(str, Enum):
    IMPROVED = "improved"
    REGRESSED = "regressed"
    UNCHANGED = "unchanged"
    ONLY_BASELINE = "only in baseline"
    ONLY_CURRENT = "only in current"


@dataclass(frozen=True)
class Decision:
    """What a decision rule concluded: the verdict, the ratio of centres (current / baseline), the p-value of the
    test where one was run, and ``rule``: how the verdict was reached, in words."""

    verdict: Verdict
    ratio: float | None
    p_value: float | None
    rule: str


# Decision rules -------------------------------------------------------------------------------------------------


def decide_samples(
    baseline: Sequence[float], current: Sequence[float], threshold: float, higher_is_better: bool = False
) -> Decision:
    """Raw timing samples: beyond the threshold AND Mann-Whitney U p < 0.002 (see the module docstring).

    >>> decide_samples([1.0] * 10 + [1.01] * 10, [1.2] * 10 + [1.21] * 10, 0.1).verdict.value
    'regressed'
    """
    ratio = _ratio(statistics.median(current), statistics.median(baseline))
    from scipy.stats import mannwhitneyu  # scipy.stats takes seconds to import: only when a test runs

    p_value = float(mannwhitneyu(baseline, current, alternative="two-sided").pvalue)
    smallest_p = min_p_value(len(baseline), len(current))
    if smallest_p < P_THRESHOLD:
        significant, rule = p_value < P_THRESHOLD, f"U test p<{P_THRESHOLD:g}"
    elif smallest_p <= FALLBACK_MAX_P:
        significant = max(baseline) < min(current) or max(current) < min(baseline)
        rule = f"no overlap ({len(baseline)}v{len(current)} samples)"
    else:
        significant = False
        rule = f"too few samples ({len(baseline)}v{len(current)})"
    return Decision(_direction(ratio, threshold, higher_is_better) if significant else Verdict.UNCHANGED,
                    ratio, p_value, rule)


def decide_exact(
    baseline: Sequence[float], current: Sequence[float], threshold: float, higher_is_better: bool = False
) -> Decision:
    """Deterministic figures (MACs, params): any change counts, whatever the threshold."""
    ratio = _ratio(statistics.median(current), statistics.median(baseline))
    return Decision(_direction(ratio, 0.0, higher_is_better), ratio, None, "any change")


def decide_threshold(
    baseline: Sequence[float], current: Sequence[float], threshold: float, higher_is_better: bool = False
) -> Decision:
    """One figure per run (memory, unknown metrics): a change of the medians beyond the threshold counts."""
    ratio = _ratio(statistics.median(current), statistics.median(baseline))
    return Decision(_direction(ratio, threshold, higher_is_better), ratio, None, f"beyond {threshold:.0%}")


def decide_seeds(
    baseline: Sequence[float], current: Sequence[float], threshold: float, higher_is_better: bool = True
) -> Decision:
    """One figure per seed (accuracy): the difference of means against the seeds' pooled spread.

    >>> decide_seeds([70.1, 70.5, 69.9], [68.0, 68.3, 67.8], 0.1).verdict.value
    'regressed'
    """
    variances = [statistics.variance(side) for side in (baseline, current) if len(side) >= 2]
    if not variances:
        single = decide_threshold(baseline, current, threshold, higher_is_better)
        return Decision(single.verdict, single.ratio, None, f"1 seed: {single.rule}")
    mean_b, mean_c = statistics.fmean(baseline), statistics.fmean(current)
    ratio = _ratio(mean_c, mean_b)
    pooled_std = math.sqrt(statistics.fmean(variances))
    if pooled_std == 0:
        return Decision(_direction(ratio, 0.0, higher_is_better), ratio, None, "identical seeds: any change")
    p_value = None
    if len(baseline) >= 2 and len(current) >= 2:
        from scipy.stats import ttest_ind

        p_value = float(ttest_ind(current, baseline, equal_var=False).pvalue)
    significant = abs(mean_c - mean_b) > SEED_SPREADS * pooled_std
    return Decision(_direction(ratio, 0.0, higher_is_better) if significant else Verdict.UNCHANGED, ratio,
                    p_value, f"{SEED_SPREADS:g} pooled std ({pooled_std:.3g})")


def min_p_value(n: int, m: int) -> float:
    """The smallest two-sided p-value an exact Mann-Whitney U test can give for n and m samples without ties.

    >>> round(min_p_value(5, 5), 4)
    0.0079
    """
    return min(1.0, 2.0 / math.comb(n + m, n))


def _ratio(current: float, baseline: float) -> float:
    if baseline == 0:
        return 1.0 if current == 0 else math.copysign(math.inf, current)
    return current / baseline


def _direction(ratio: float, threshold: float, higher_is_better: bool) -> Verdict:
    if ratio > 1 + threshold:
        return Verdict.IMPROVED if higher_is_better else Verdict.REGRESSED
    if ratio < 1 / (1 + threshold):
        return Verdict.REGRESSED if higher_is_better else Verdict.IMPROVED
    return Verdict.UNCHANGED


# Metrics: where each one's observations are in a record, and which rule judges them -------------------------------

DecisionRule = Callable[[Sequence[float], Sequence[float], float, bool], Decision]
Reader = Callable[[Mapping[str, Any]], "list[float] | None"]


def headline(name: str) -> Reader:
    """Reads ``metrics[name]["value"]`` as a single observation."""

    def read(metrics: Mapping[str, Any]) -> list[float] | None:
        value = metrics.get(name, {}).get("value")
        return [float(value)] if isinstance(value, (int, float)) and math.isfinite(value) else None

    return read


def _measurement(metrics: Mapping[str, Any], path: Sequence[str]) -> Mapping[str, Any] | None:
    node: Any = metrics
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def samples(*path: str) -> Reader:
    """Reads the raw ``samples`` of the measurement at ``metrics[path[0]][path[1]]...``."""

    def read(metrics: Mapping[str, Any]) -> list[float] | None:
        found = (_measurement(metrics, path) or {}).get("samples")
        return [float(v) for v in found] if found else None

    return read


def relative_samples(*path: str) -> Reader:
    """Reads the :attr:`~drbench.measure.timing.LatencyMeasurement.relative_samples` of the measurement at
    ``path``: each sample over the reference kernel's of the same round; None where no reference was timed."""

    def read(metrics: Mapping[str, Any]) -> list[float] | None:
        node = _measurement(metrics, path)
        if not node or not node.get("samples") or not (node.get("reference") or {}).get("samples"):
            return None
        return list(LatencyMeasurement.from_dict(node).relative_samples)

    return read


def seed_values(name: str) -> Reader:
    """Reads one figure per seed: the ``top1`` of each run in ``metrics[name]["runs"]`` (diverged runs, whose
    ``top1`` is None, are left out); the headline alone when the runs were not stored."""

    def read(metrics: Mapping[str, Any]) -> list[float] | None:
        runs = metrics.get(name, {}).get("runs")
        if not runs:
            return headline(name)(metrics)
        return [float(run["top1"]) for run in runs if run.get("top1") is not None] or None

    return read


@dataclass(frozen=True)
class MetricRule:
    """How one metric is compared: where its observations are, the rule that judges them, the better direction,
    the statistic that summarises one side (``median`` or ``mean``), and ``relative``: where the observations
    divided by the reference kernel's are, judged instead of the raw ones when both sides have them."""

    read: Reader
    decide: DecisionRule
    higher_is_better: bool = False
    centre: Callable[[Sequence[float]], float] = statistics.median
    relative: Reader | None = None

    def judge(self, baseline: Sequence[float], current: Sequence[float], threshold: float) -> Decision:
        return self.decide(baseline, current, threshold, self.higher_is_better)


METRIC_RULES: dict[str, MetricRule] = {
    "latency": MetricRule(samples("latency"), decide_samples, relative=relative_samples("latency")),
    "latency.train": MetricRule(samples("latency", "train"), decide_samples,
                                relative=relative_samples("latency", "train")),
    "macs": MetricRule(headline("macs"), decide_exact),
    "params": MetricRule(headline("params"), decide_exact),
    "memory": MetricRule(headline("memory"), decide_threshold),
    "accuracy": MetricRule(seed_values("accuracy"), decide_seeds, higher_is_better=True, centre=statistics.fmean),
}


def rule_for(metric: str) -> MetricRule:
    """The rule of a built-in metric; any other metric's headline is judged by the threshold."""
    return METRIC_RULES.get(metric) or MetricRule(headline(metric), decide_threshold)


def metrics_in(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The comparable metrics the records hold: built-in ones first, in :data:`METRIC_RULES` order."""
    found: set[str] = set()
    for record in records:
        metrics = record.get("metrics") or {}
        found.update(metrics)
        if isinstance(metrics.get("latency"), Mapping) and "train" in metrics["latency"]:
            found.add("latency.train")
    return [m for m in METRIC_RULES if m in found] + sorted(found - set(METRIC_RULES))


def format_value(metric: str, value: float | None) -> str:
    """A metric's stored value in its display unit: ``format_value("latency", 0.0123) == '12.3 ms'``."""
    if value is None or not math.isfinite(value):
        return "-"
    scale, unit = METRIC_UNITS.get(metric, (1.0, ""))
    shown = value * scale
    return (f"{shown:,.0f} {unit}" if abs(shown) >= 1000 else f"{shown:.3g} {unit}").rstrip()


def shorten_labels(labels: Iterable[str]) -> tuple[str, dict[str, str]]:
    """The words every label shares (to say once, in a heading) and each label without them.

    >>> shorten_labels(["resnet 1x conv 32px", "resnet 1x drconv 32px"])
    ('resnet 1x 32px', {'resnet 1x conv 32px': 'conv', 'resnet 1x drconv 32px': 'drconv'})
    """
    distinct = list(dict.fromkeys(labels))
    if len(distinct) < 2:
        return "", {label: label for label in distinct}
    shared = set.intersection(*(set(label.split()) for label in distinct))
    common = " ".join(word for word in distinct[0].split() if word in shared)
    return common, {label: " ".join(w for w in label.split() if w not in shared) or label for label in distinct}


def cell_label(config: Mapping[str, Any]) -> str:
    """A cell's short human name (:meth:`Cell.label`); ``key=value`` pairs when the config is not a valid cell."""
    cell_keys = set(Cell.model_fields) - {"op_options"}
    try:
        cell = Cell.model_validate({**{k: v for k, v in config.items() if k in cell_keys},
                                    "op_options": {k: v for k, v in config.items() if k not in cell_keys}})
    except ValueError:
        return " ".join(f"{key}={value}" for key, value in config.items())
    return cell.label()


# Sides ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """The records of one side of a comparison and where they came from (``name``: what the user gave)."""

    name: str
    source: str
    records: tuple[dict, ...] = field(repr=False)

    def environment(self) -> dict[str, list[str]]:
        """Each of :data:`ENVIRONMENT_KEYS` -> the distinct values among this side's records."""
        return {key: sorted({str(r.get("env", {}).get(key)) for r in self.records}) for key in ENVIRONMENT_KEYS}

    def commits(self) -> list[str]:
        """Distinct commits of the records, dirty ones marked ``+`` (uncommitted changes)."""
        return sorted({commit_label(r.get("env", {})) for r in self.records})

    def by_cell(self) -> dict[str, list[dict]]:
        """config hash -> that cell's records, oldest first."""
        cells: dict[str, list[dict]] = {}
        for record in sorted(self.records, key=record_time):
            cells.setdefault(record["config_hash"], []).append(record)
        return cells

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "records": len(self.records),
                "commits": self.commits(), "environment": self.environment()}


def record_time(record: Mapping[str, Any]) -> tuple[str, str]:
    """A sort key that orders records by when they were measured."""
    return record.get("started") or record.get("env", {}).get("time") or "", record.get("run_id") or ""


def commit_label(env: Mapping[str, Any]) -> str:
    """``3db48f3`` for a clean checkout, ``3db48f3+`` with uncommitted changes, ``unknown`` outside git."""
    commit = env.get("git_commit")
    return f"{commit[:7]}{'+' if env.get('git_dirty') else ''}" if commit else "unknown"


def resolve_side(spec: str, results_dir: str | Path = "results", *, suite: str | None = None,
                 repo: str | Path | None = None) -> Side:
    """``spec`` as a results file or folder if one exists, else as a git commit or ref whose records are in
    ``results_dir`` (a ref git knows, or a unique prefix of a commit stored there); ``suite`` keeps one suite."""
    path = Path(spec)
    if path.exists():
        side = Side(spec, str(path), tuple(read_records(path)))
    else:
        side = _commit_side(spec, Path(results_dir), repo)
    if suite is not None:
        kept = tuple(r for r in side.records if r.get("suite") == suite)
        if not kept:
            found = ", ".join(sorted({str(r.get("suite")) for r in side.records})) or "none"
            raise CompareError(f"{side.source}: no records of suite {suite!r}; suites there: {found}")
        side = Side(side.name, f"{side.source}, suite {suite}", kept)
    if not side.records:
        raise CompareError(f"{side.source}: no records")
    return side


def _commit_side(spec: str, results_dir: Path, repo: str | Path | None) -> Side:
    if not results_dir.is_dir():
        raise CompareError(f"{spec!r} is not a results file or folder, and the results folder {results_dir} "
                           "(where commits are looked up) does not exist")
    records = read_records(results_dir)
    stored = {r.get("env", {}).get("git_commit") for r in records} - {None}
    commit = _git_commit(spec, repo)
    if commit is None:
        prefixed = [c for c in stored if len(spec) >= 4 and c.startswith(spec.lower())]
        commit = prefixed[0] if len(prefixed) == 1 else None
    known = ", ".join(sorted(c[:7] for c in stored)) or "none"
    if commit is None:
        raise CompareError(f"{spec!r} is neither a results file or folder nor a git commit with results in "
                           f"{results_dir} (commits with results: {known})")
    kept = tuple(r for r in records if r.get("env", {}).get("git_commit") == commit)
    if not kept:
        raise CompareError(f"no results of commit {commit[:7]} ({spec}) in {results_dir}; run `drbench run` on "
                           f"that commit first (commits with results: {known})")
    named = "" if commit.startswith(spec.lower()) else f" ({spec})"
    return Side(spec, f"commit {commit[:7]}{named} in {results_dir}", kept)


def _git_commit(ref: str, repo: str | Path | None) -> str | None:
    """The full hash git gives ``ref``, or None when git does not know it (or there is no git)."""
    try:
        return run_git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}", repo=repo) or None
    except (OSError, subprocess.SubprocessError):
        return None


# The comparison -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellComparison:
    """One metric of one cell on both sides: the centres (median, or mean of seeds), the number of observations,
    and the :class:`Decision`'s verdict, ratio, p-value and rule."""

    config_hash: str
    label: str
    metric: str
    verdict: Verdict
    baseline: float | None
    current: float | None
    ratio: float | None
    p_value: float | None
    rule: str
    baseline_n: int
    current_n: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["verdict"] = self.verdict.value
        data["ratio"] = self.ratio if self.ratio is not None and math.isfinite(self.ratio) else None
        return data


_VERDICT_ORDER = list(Verdict)
_ORDER = {Verdict.REGRESSED: 0, Verdict.IMPROVED: 1, Verdict.ONLY_BASELINE: 2, Verdict.ONLY_CURRENT: 3,
          Verdict.UNCHANGED: 4}


@dataclass(frozen=True)
class Comparison:
    """Every compared metric of every cell, the two sides, and the differences of their environments."""

    baseline: Side
    current: Side
    threshold: float
    metrics: tuple[str, ...]
    cells: tuple[CellComparison, ...]
    environment_differences: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def regressed(self) -> tuple[CellComparison, ...]:
        return tuple(c for c in self.cells if c.verdict is Verdict.REGRESSED)

    def counts(self) -> dict[str, int]:
        """Verdict -> number of (cell, metric) rows, every verdict listed."""
        return {v.value: sum(c.verdict is v for c in self.cells) for v in _VERDICT_ORDER}

    def ordered(self) -> list[CellComparison]:
        """Regressions first, then improvements, one-sided cells and unchanged ones, each by cell label."""
        return sorted(self.cells, key=lambda c: (_ORDER[c.verdict], c.label, c.metric))

    def headline(self) -> str:
        counts = self.counts()
        return ", ".join(f"{n} {v}" for v, n in counts.items()) + f" (threshold {self.threshold:.0%})"

    def to_json(self) -> str:
        return json.dumps({
            "baseline": self.baseline.summary(),
            "current": self.current.summary(),
            "threshold": self.threshold,
            "metrics": list(self.metrics),
            "environment_differences": list(self.environment_differences),
            "notes": list(self.notes),
            "counts": self.counts(),
            "cells": [c.to_dict() for c in self.ordered()],
        }, indent=2)

    def to_markdown(self) -> str:
        """A pull-request comment: headline, environment warnings, and one table row per compared metric."""
        lines = [f"### drbench compare: {markdown_code(self.baseline.name)} → {markdown_code(self.current.name)}", ""]
        lines += [f"> **Warning:** {markdown_text(difference)}" for difference in self.environment_differences]
        lines += [f"> Note: {markdown_text(note)}" for note in self.notes]
        if self.environment_differences or self.notes:
            lines.append("")
        common, short = shorten_labels(c.label for c in self.cells)
        lines += [f"**{self.headline()}**", ""]
        lines += [f"Every cell: {markdown_text(common)}", ""] if common else []
        lines += ["| cell | metric | baseline | current | ratio | p | result | rule |",
                  "|---|---|---:|---:|---:|---:|---|---|"]
        for c in self.ordered():
            verdict = f"**{c.verdict.value}**" if c.verdict is Verdict.REGRESSED else c.verdict.value
            lines.append(f"| {markdown_text(short[c.label])} | {markdown_text(c.metric)} | "
                         f"{format_value(c.metric, c.baseline)} | {format_value(c.metric, c.current)} | "
                         f"{format_ratio(c.ratio)} | {format_p(c.p_value)} | {verdict} | {markdown_text(c.rule)} |")
        return "\n".join(lines) + "\n"


def format_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}x"


def format_p(p_value: float | None) -> str:
    return "-" if p_value is None else f"{p_value:.2g}"


def compare(baseline: Side, current: Side, *, threshold: float = DEFAULT_THRESHOLD,
            metrics: Sequence[str] | None = None) -> Comparison:
    """Compare each cell's observations on both sides (see the module docstring for the rules)."""
    if threshold < 0:
        raise CompareError(f"threshold must be at least 0, got {threshold}")
    available = metrics_in(baseline.records + current.records)
    chosen = list(metrics) if metrics else available
    missing = [m for m in chosen if m not in available]
    if missing:
        raise CompareError(f"metric {', '.join(missing)} is on neither side; measured: {', '.join(available)}")
    base_cells, cur_cells = baseline.by_cell(), current.by_cell()
    same_torch = baseline.environment()["torch_version"] == current.environment()["torch_version"]
    rows: list[CellComparison] = []
    failed_both = 0
    for key in sorted(base_cells.keys() | cur_cells.keys()):
        base, cur = base_cells.get(key, []), cur_cells.get(key, [])
        if base and cur and not _successful(base) and not _successful(cur):
            failed_both += 1
            continue
        rows += _compare_cell(base, cur, chosen, threshold, relative=same_torch)
    notes = [f"{failed_both} cells failed on both sides (not compared)"] if failed_both else []
    if not same_torch:
        notes.append("torch versions differ: latency is judged on raw samples, not relative to the reference "
                     "kernel (which runs on torch too)")
    for name, side in (("baseline", baseline), ("current", current)):
        dirty = [commit for commit in side.commits() if commit.endswith("+")]
        if dirty:
            notes.append(f"{name} was measured with uncommitted changes ({', '.join(dirty)})")
    return Comparison(baseline, current, threshold, tuple(chosen), tuple(rows),
                      tuple(environment_differences(baseline, current)), tuple(notes))


def _compare_cell(base: list[dict], cur: list[dict], metrics: Sequence[str],
                  threshold: float, relative: bool = True) -> list[CellComparison]:
    first = (base or cur)[0]
    key, label = first["config_hash"], cell_label(first["config"])
    rows = []
    for metric in metrics:
        rule = rule_for(metric)
        base_obs, cur_obs = _pooled(rule.read, base), _pooled(rule.read, cur)
        if base_obs is None and cur_obs is None and _successful(base + cur):
            continue  # a metric this cell does not have
        decision = None
        if relative and rule.relative is not None and base_obs and cur_obs:
            base_rel, cur_rel = _pooled(rule.relative, base, every=True), _pooled(rule.relative, cur, every=True)
            if base_rel and cur_rel:
                judged = rule.judge(base_rel, cur_rel, threshold)
                decision = replace(judged, rule=f"vs reference, {judged.rule}")
        if decision is None:
            decision = _decide(rule, base, cur, base_obs, cur_obs, threshold)
        rows.append(CellComparison(
            key, label, metric, decision.verdict,
            rule.centre(base_obs) if base_obs else None, rule.centre(cur_obs) if cur_obs else None,
            decision.ratio, decision.p_value, decision.rule, len(base_obs or ()), len(cur_obs or ()),
        ))
    return rows


def _successful(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok"]


def _pooled(read: Reader, records: list[dict], every: bool = False) -> list[float] | None:
    """The observations of every successful run of a cell together (runs of one side are replicates); with
    ``every``, None unless each run has them."""
    found = [read(record["metrics"]) for record in _successful(records)]
    if every and not all(found):
        return None
    pooled = [value for values in found for value in values or ()]
    return pooled or None


def _decide(rule: MetricRule, base: list[dict], cur: list[dict], base_obs: list[float] | None,
            cur_obs: list[float] | None, threshold: float) -> Decision:
    if base_obs is not None and cur_obs is not None:
        return rule.judge(base_obs, cur_obs, threshold)
    if cur and not _successful(cur):
        return Decision(Verdict.REGRESSED, None, None, f"fails now: {cur[-1]['error']}")
    if base and not _successful(base):
        return Decision(Verdict.IMPROVED, None, None, f"failed before: {base[-1]['error']}")
    if cur_obs is None:
        return Decision(Verdict.ONLY_BASELINE, None, None, "not measured in current")
    return Decision(Verdict.ONLY_CURRENT, None, None, "not measured in baseline")


def environment_differences(baseline: Side, current: Side) -> list[str]:
    """One line per environment field that differs between the sides or is mixed within one."""
    differences = []
    base_env, cur_env = baseline.environment(), current.environment()
    for key in ENVIRONMENT_KEYS:
        if base_env[key] != cur_env[key]:
            differences.append(f"{key} differs: {', '.join(base_env[key])} (baseline) vs "
                               f"{', '.join(cur_env[key])} (current)")
        else:
            differences += [f"{name} mixes {key}: {', '.join(env[key])}"
                            for name, env in (("baseline", base_env), ("current", cur_env)) if len(env[key]) > 1]
    return differences


def compare_results(baseline: str, current: str, *, results_dir: str | Path = "results", suite: str | None = None,
                    threshold: float = DEFAULT_THRESHOLD, metrics: Sequence[str] | None = None,
                    repo: str | Path | None = None) -> Comparison:
    """Resolve both sides (:func:`resolve_side`) and :func:`compare` them."""
    sides = [resolve_side(spec, results_dir, suite=suite, repo=repo) for spec in (baseline, current)]
    return compare(*sides, threshold=threshold, metrics=metrics)


def parse_threshold(text: str) -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1; a bare number above 1 is ambiguous and rejected.

    >>> parse_threshold("5%")
    0.05
    """
    stripped = text.strip()
    percent = stripped.endswith("%")
    try:
        value = float(stripped[:-1]) / 100 if percent else float(stripped)
    except ValueError:
        value = math.nan
    if not (0 <= value <= (math.inf if percent else 1)):
        raise CompareError(f"--threshold {text!r}: expected a percentage such as 10% or a fraction such as 0.1")
    return value
