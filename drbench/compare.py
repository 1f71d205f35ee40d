"""Compare two sets of results cell by cell, with decision rules that measurement noise does not fool.

Each side is a results file or folder, or a git commit (or ref) whose records are in the results store. Cells are
matched by their configuration hash; the environment (threads, host, device, library versions) is not part of a
cell's identity, and :attr:`Comparison.environment_differences` says where the two sides' environments differ.

>>> comparison = compare_results("1a2b3c4", "5e6f7a8", results_dir="results")
>>> comparison.regressed, comparison.counts()["unchanged"]
((), 18)

The seams: the decision rules are pure statistics (:mod:`drbench.stats`); which rule judges a metric, where its
observations are and its unit are the metric's own declaration (:class:`drbench.metric_registry.Quantity`); the
sides and git are :mod:`drbench.sides`; the text, JSON and Markdown are :mod:`drbench.compare_format`. This module
matches the cells and applies each quantity's rule. drbench's own metrics declare: ``latency`` and
``latency.train`` raw samples (:func:`~drbench.stats.decide_samples`), ``macs`` and ``params`` any change
(:func:`~drbench.stats.decide_exact`), ``memory`` beyond the threshold (:func:`~drbench.stats.decide_threshold`,
also the rule of a metric no registered metric declares), ``accuracy`` one figure per seed, higher is better
(:func:`~drbench.stats.decide_seeds`).

Latency (raw samples, :func:`drbench.stats.decide_samples`): where every run on both sides timed drbench's reference
kernel in turns with the cell (:func:`drbench.measure.timing.time_with_reference`) and the torch versions agree,
the rule judges the *relative* samples (each over the reference kernel's sample of its round), and the ratio shown
is theirs: a shared machine that runs slower for a while slows both alike, and no test on the samples of one run
could see that drift between runs. Otherwise the raw samples are judged and the rule says so.

Several runs of a cell on one side (``drbench run --force`` again, or a folder holding several run files) are
replicates: their observations are pooled, so between-run drift widens the spread the test sees. A cell with no
successful run on one side and one on the other counts as a regression (fails now) or an improvement (failed
before); a cell measured on one side only is reported as such and is not a regression.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from drbench.metric_registry import Quantity, Reader, quantities_in, quantity
from drbench.sides import ENVIRONMENT_KEYS, CompareError, Side, resolve_side
from drbench.stats import DEFAULT_THRESHOLD, Decision, Verdict
from drbench.suite import label


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


def compare(baseline: Side, current: Side, *, threshold: float = DEFAULT_THRESHOLD,
            metrics: Sequence[str] | None = None) -> Comparison:
    """Compare each cell's observations on both sides (see the module docstring for the rules)."""
    if threshold < 0:
        raise CompareError(f"threshold must be at least 0, got {threshold}")
    available = quantities_in(baseline.records + current.records)
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
    key, name = first["config_hash"], label(first["config"])
    rows = []
    for metric in metrics:
        rule = quantity(metric)
        base_obs, cur_obs = _pooled(rule.observations, base), _pooled(rule.observations, cur)
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
            key, name, metric, decision.verdict,
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


def _decide(rule: Quantity, base: list[dict], cur: list[dict], base_obs: list[float] | None,
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
