"""A metric defined in this one file, as a plugin would define it: its measurement, its unit, the direction that is
better, where its observations are and the rule that judges a change. Nothing else in drbench names it; the tests
in test_metric_plugin.py check that show, report and compare present and judge it all the same."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from drbench.metric_registry import MetricSettings, Quantity, RunContext, register_metric, samples
from drbench.stats import Decision, Verdict

if TYPE_CHECKING:
    from drbench.suite import Cell

RULE = "plugin: any rise of the median"


def decide_any_rise(baseline: Sequence[float], current: Sequence[float], threshold: float,
                    higher_is_better: bool) -> Decision:
    """The plugin's own rule: a higher median is a regression, however small; the threshold does not apply."""
    before, after = sorted(baseline)[len(baseline) // 2], sorted(current)[len(current) // 2]
    verdict = Verdict.REGRESSED if after > before else Verdict.IMPROVED if after < before else Verdict.UNCHANGED
    return Decision(verdict, after / before if before else None, None, RULE)


@register_metric("energy", quantities=[
    Quantity("energy", unit="mJ", scale=1e3, read=samples("energy"), decide=decide_any_rise, column="energy"),
])
def measure_energy(cell: Cell, settings: MetricSettings, context: RunContext) -> dict:
    """Energy of one forward pass (a stand-in: proportional to the batch size)."""
    joules = [0.002 * cell.batch_size] * 3
    return {"value": joules[0], "samples": joules}
