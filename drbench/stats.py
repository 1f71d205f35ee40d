"""The decision rules of a comparison: pure statistics on two sides' observations of one metric, no records.

Each rule takes the baseline's and the current side's observations (``ratio`` is current / baseline; "beyond the
threshold" ``t`` means ``ratio > 1 + t`` or ``ratio < 1 / (1 + t)``, symmetric in log scale) and returns a
:class:`Decision`; which metric uses which rule is the metric's own declaration (:mod:`drbench.metric_registry`).

- :func:`decide_samples` (raw timing samples): a change counts when the ratio of medians is beyond the threshold
  AND the samples differ statistically: a two-sided Mann-Whitney U test gives ``p < 0.002`` (asv's rule). With few
  samples the test cannot reach p < 0.002: the smallest two-sided p of n and m untied samples is
  ``2 / C(n + m, n)`` (0.0079 for 5 vs 5, 0.0022 for 6 vs 6). Then, while that smallest p is at most 0.01, the
  change counts only if the two samples do not overlap at all (every sample of one side beyond every sample of the
  other: the widest distribution-free confidence interval of each median, asv's fallback); with fewer samples
  still (3 vs 3: smallest p 0.1) nothing counts and the rule says the samples are too few.
- :func:`decide_exact` (deterministic figures): any change counts.
- :func:`decide_threshold` (one figure per run): a change beyond the threshold counts.
- :func:`decide_seeds` (one figure per seed): a change counts when the difference of the seed means exceeds twice
  the pooled standard deviation of the seeds (``sqrt((s_b^2 + s_c^2) / 2)``, the sides with at least two seeds);
  the threshold does not apply, and Welch's t-test p-value is reported beside it. Identical seeds on both sides (a
  deterministic trainer) make any difference count; with a single seed per side the spread is unknown and the
  threshold rule applies.

Between operators of one run (the report's "vs conv" accuracy), seeds are paired: a seed gives every operator the
same data order and augmentation, so :func:`paired_difference` takes the per-seed differences and their Student-t
confidence interval.

This module is a leaf: it imports nothing of drbench.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

P_THRESHOLD = 0.002
"""Mann-Whitney U p-value below which two latency samples count as different (asv's choice)."""

FALLBACK_MAX_P = 0.01
"""With too few samples for the test to reach P_THRESHOLD, non-overlapping samples still count while the smallest
achievable p is at most this; below it nothing counts."""

SEED_SPREADS = 2.0
"""Accuracy: a difference of means beyond this many pooled standard deviations counts."""

DEFAULT_THRESHOLD = 0.10

NOISY_REL_IQR = 0.10
"""IQR/median above which a latency measurement is flagged noisy (torch.utils.benchmark's threshold): the runner
flags it when measuring, reports mark it."""


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


DecisionRule = Callable[[Sequence[float], Sequence[float], float, bool], Decision]
"""``rule(baseline, current, threshold, higher_is_better) -> Decision``."""


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


PAIRED_CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """The mean of per-seed differences (current - baseline, seeds both sides finished) and its confidence
    interval; ``verdict`` is "better" or "worse" when the interval excludes 0, else "no difference", and
    "one seed" when a single pair leaves the spread unknown (``low`` and ``high`` are then NaN)."""

    mean: float
    low: float
    high: float
    seeds: int
    verdict: str


def paired_difference(current: dict[int, float], baseline: dict[int, float], higher_is_better: bool = True,
                      confidence: float = PAIRED_CONFIDENCE) -> PairedDifference | None:
    """Per-seed differences ``current[s] - baseline[s]`` over the seeds of both, their mean and Student-t interval;
    None when no seed is shared.

    >>> d = paired_difference({0: 61.0, 1: 62.5, 2: 61.0}, {0: 60.0, 1: 61.0, 2: 59.5})
    >>> round(d.mean, 2), round(d.low, 2), round(d.high, 2), d.verdict
    (1.33, 0.62, 2.05, 'better')
    """
    seeds = sorted(set(current) & set(baseline))
    if not seeds:
        return None
    differences = [current[seed] - baseline[seed] for seed in seeds]
    mean = statistics.fmean(differences)
    if len(seeds) == 1:
        return PairedDifference(mean, math.nan, math.nan, 1, "one seed")
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, len(seeds) - 1)) * statistics.stdev(differences) / math.sqrt(len(seeds))
    low, high = mean - half, mean + half
    if low > 0 or high < 0:
        verdict = "better" if (low > 0) == higher_is_better else "worse"
    else:
        verdict = "no difference"
    return PairedDifference(mean, low, high, len(seeds), verdict)


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
