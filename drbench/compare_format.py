"""How a comparison reads: the table's text (units, ratios, p-values, shortened cell labels), JSON for machines
and Markdown for pull-request comments. Every text taken from records is escaped (:mod:`drbench.textsafe`).

>>> from drbench.compare import compare_results
>>> print(comparison_markdown(compare_results("1a2b3c4", "5e6f7a8")).splitlines()[0])
### drbench compare: `1a2b3c4` → `5e6f7a8`
"""

from __future__ import annotations

import json
from typing import Iterable

from drbench.compare import Comparison
from drbench.metric_registry import format_value
from drbench.stats import Verdict
from drbench.textsafe import markdown_code, markdown_text


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


def format_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}x"


def format_p(p_value: float | None) -> str:
    return "-" if p_value is None else f"{p_value:.2g}"


def comparison_json(comparison: Comparison) -> str:
    """The whole comparison for machines: both sides, the settings, the counts and every row, regressions first."""
    return json.dumps({
        "baseline": comparison.baseline.summary(),
        "current": comparison.current.summary(),
        "threshold": comparison.threshold,
        "metrics": list(comparison.metrics),
        "environment_differences": list(comparison.environment_differences),
        "notes": list(comparison.notes),
        "counts": comparison.counts(),
        "cells": [c.to_dict() for c in comparison.ordered()],
    }, indent=2)


def comparison_markdown(comparison: Comparison) -> str:
    """A pull-request comment: headline, environment warnings, and one table row per compared metric."""
    baseline, current = markdown_code(comparison.baseline.name), markdown_code(comparison.current.name)
    lines = [f"### drbench compare: {baseline} → {current}", ""]
    lines += [f"> **Warning:** {markdown_text(difference)}" for difference in comparison.environment_differences]
    lines += [f"> Note: {markdown_text(note)}" for note in comparison.notes]
    if comparison.environment_differences or comparison.notes:
        lines.append("")
    common, short = shorten_labels(c.label for c in comparison.cells)
    lines += [f"**{comparison.headline()}**", ""]
    lines += [f"Every cell: {markdown_text(common)}", ""] if common else []
    lines += ["| cell | metric | baseline | current | ratio | p | result | rule |",
              "|---|---|---:|---:|---:|---:|---|---|"]
    for c in comparison.ordered():
        verdict = f"**{c.verdict.value}**" if c.verdict is Verdict.REGRESSED else c.verdict.value
        lines.append(f"| {markdown_text(short[c.label])} | {markdown_text(c.metric)} | "
                     f"{format_value(c.metric, c.baseline)} | {format_value(c.metric, c.current)} | "
                     f"{format_ratio(c.ratio)} | {format_p(c.p_value)} | {verdict} | {markdown_text(c.rule)} |")
    return "\n".join(lines) + "\n"


