"""Figures of a report (matplotlib, no display needed): which ones apply follows from the axes in the results.

- ``gain_vs_size`` (two widths or more, conv and another operator): the paper's Fig. 4, the gain of each operator
  over standard convolution against the model's size (MACs of its standard-conv version), one line per model
  family. The gain is top-1 points where accuracy was measured; otherwise the latency ratio and the MACs overhead,
  and the title says so.
- ``pareto``: top-1 (or, without accuracy, latency) against MACs for every measured cell, the Pareto front marked;
  the front leaves out (and crosses) what the report marks as a smoke test or noise: top-1 from a single seed or
  at chance, noisy latency (:func:`front_eligible`).
- ``vs_regions`` (two region counts or more) and ``vs_input_size`` (two input sizes or more): MACs, params and
  latency against the axis; an operator without that axis (conv has no regions) is a dashed level line.

Error bars: latency from the quartiles of the raw samples (a ratio's bar propagates both cells' relative IQR);
accuracy from the standard deviation over seeds; an accuracy gain's bar is the 95% confidence interval of the
per-seed differences (seeds pair operators), or, with one seed, both cells' spreads combined as independent.

>>> from drbench.report.cells import load_results
>>> results = load_results(["results/quick"])
>>> plots = make_plots(results.cells, results.config_keys)
>>> [path.name for plot in plots for path in save_plot(plot, "reports/quick/plots")]
['pareto.png', 'pareto.svg']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from drbench.report.cells import BASELINE_OP, format_setting, hashable_value, is_missing
from drbench.report.tables import POINTS, QUANTITIES, RATIO, agrees, comparison_table, row_keys
from drbench.stats import NOISY_REL_IQR

PNG_DPI = 150
STYLE = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7}
OP_COLOURS = {"conv": "#4d4d4d", "drconv": "#d62728", "condconv": "#1f77b4", "local": "#2ca02c"}
SPARE_COLOURS = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Plot:
    """A figure and what the report says about it; ``name`` is its file stem."""

    name: str
    title: str
    caption: str
    figure: Figure


def make_plots(cells: pd.DataFrame, config_keys: Sequence[str]) -> list[Plot]:
    """Every figure that applies to these cells (failed cells are left out)."""
    ok = cells[cells["status"] == "ok"] if "status" in cells else cells
    if ok.empty:
        return []
    builders: list[Callable[[pd.DataFrame, Sequence[str]], Plot | None]] = [
        gain_vs_size, pareto, lambda c, k: sweep(c, k, "regions"), lambda c, k: sweep(c, k, "input_size")]
    with matplotlib.rc_context(STYLE):
        return [plot for build in builders if (plot := build(ok, config_keys)) is not None]


def save_plot(plot: Plot, directory: str | Path) -> tuple[Path, Path]:
    """Write ``<name>.png`` and ``<name>.svg`` into ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    png, svg = directory / f"{plot.name}.png", directory / f"{plot.name}.svg"
    plot.figure.savefig(png, dpi=PNG_DPI, bbox_inches="tight")
    plot.figure.savefig(svg, bbox_inches="tight")
    return png, svg


def gain_vs_size(cells: pd.DataFrame, config_keys: Sequence[str]) -> Plot | None:
    """Fig. 4: each operator's gain over conv against the conv model's MACs, one line per family and operator."""
    table = comparison_table(cells, config_keys)
    if table.empty or "width" not in table.index.names or BASELINE_OP not in table.columns.get_level_values("op"):
        return None
    top1, macs, latency = (_quantity(name) for name in ("top1", "macs_m", "latency_ms"))
    ops = [op for op in dict.fromkeys(table.columns.get_level_values("op")) if op != BASELINE_OP]
    with_accuracy = any((op, top1.delta_header) in table and table[(op, top1.delta_header)].notna().any()
                        for op in ops)
    gain_of = top1 if with_accuracy else macs
    groups = [k for k in table.index.names if k != "width"]
    rows_of = _grouped(table, groups)
    series = [(group, op) for group, rows in rows_of.items() for op in ops
              if (op, gain_of.delta_header) in table and rows[(op, gain_of.delta_header)].notna().sum() >= 2]
    if not series:
        return None
    if with_accuracy:
        panels = [(top1, "top-1 gain over conv (points)", 0.0)]
        title = "Top-1 gain over standard convolution vs model size"
    else:
        panels = [(latency, "latency (x conv, median)", 1.0), (macs, "MACs overhead vs conv (%)", 0.0)]
        title = "No accuracy measured: latency and MACs overhead over standard convolution vs model size"
    figure = Figure(figsize=(3.4 * len(panels) + 0.4, 3.3), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    label_keys = ["model", *_differing(groups, [group for group, _ in series], exclude=("model",))]
    families = list(dict.fromkeys(group for group, _ in series))
    for (quantity, label, level), ax in zip(panels, axes):
        tops: dict[tuple, tuple[float, float]] = {}  # (family, width) -> its highest point: where its label goes
        for group, op in series:
            rows = rows_of[group]
            y, err = _gain(rows, op, quantity)
            x = rows[(BASELINE_OP, macs.header)].to_numpy(dtype=float)
            line = families.index(group)
            ax.errorbar(x, y, yerr=err, color=_colour(op), marker=MARKERS[line % len(MARKERS)], markersize=4,
                        linestyle=LINESTYLES[line % len(LINESTYLES)], capsize=2,
                        label=_series_label(groups, group, label_keys, op))
            for xi, yi, width in zip(x, y, rows.index.get_level_values("width")):
                if not math.isnan(yi) and yi > tops.get((group, width), (xi, -math.inf))[1]:
                    tops[(group, width)] = (xi, yi)
        for (_, width), point in tops.items():
            ax.annotate(f"{format_setting(width)}x", point, textcoords="offset points", xytext=(3, 3), fontsize=6,
                        color="#555555")
        ax.axhline(level, color="#888888", linewidth=0.8, linestyle=":")
        _log_scale(ax, "x", table[(BASELINE_OP, macs.header)])
        ax.set_xlabel("model size: MACs of the standard-conv model (M)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _legend_below(figure, axes[0])
    figure.suptitle(title, fontsize=9)
    caption = ("Each point is one model width (labelled); x is the MACs of that width's standard-conv model. "
               + ("Error bars: 95% confidence interval of the per-seed differences (paired seeds)." if with_accuracy
                  else
                  "Error bars: the latency ratio's spread from both cells' IQR/median."))
    return Plot("gain_vs_size", title, caption, figure)


def pareto(cells: pd.DataFrame, config_keys: Sequence[str]) -> Plot | None:
    """Top-1 (or latency) against MACs for every cell, with the Pareto front."""
    with_accuracy = cells["top1"].notna().any()
    y_column = "top1" if with_accuracy else "latency_ms"
    points = cells[cells["macs_m"].notna() & cells[y_column].notna()]
    if len(points) < 2:
        return None
    figure = Figure(figsize=(5.0, 3.6), layout="constrained")
    ax = figure.subplots()
    models = list(dict.fromkeys(points["model"]))
    for (model, op), group in points.groupby(["model", "op"], sort=False):
        if with_accuracy:
            err = group["top1_std"].fillna(0).to_numpy()
        else:
            err = np.vstack([group["latency_ms"] - group["latency_q1_ms"], group["latency_q3_ms"] - group["latency_ms"]])
        ax.errorbar(group["macs_m"], group[y_column], yerr=err, color=_colour(op), linestyle="none",
                    marker=MARKERS[models.index(model) % len(MARKERS)], markersize=5, capsize=2,
                    label=f"{model} {op}")
    conclusive = points[front_eligible(points, with_accuracy)]
    if len(conclusive) >= 2:
        front = pareto_front(conclusive["macs_m"].to_numpy(), conclusive[y_column].to_numpy(),
                             higher_is_better=with_accuracy)
        front_points = conclusive.iloc[front].sort_values("macs_m")
        ax.plot(front_points["macs_m"], front_points[y_column], drawstyle="steps-post", color="black",
                linewidth=0.9, linestyle="--", label="Pareto front")
        ax.scatter(front_points["macs_m"], front_points[y_column], s=90, facecolors="none", edgecolors="black",
                   linewidths=0.9)
    left_out = points.drop(conclusive.index)
    if not left_out.empty:
        ax.scatter(left_out["macs_m"], left_out[y_column], s=60, marker="x", color="#888888", linewidths=0.9,
                   label="left out of the front")
    _log_scale(ax, "x", points["macs_m"])
    ax.set_xlabel("MACs (M, log scale)")
    if with_accuracy:
        ax.set_ylabel("top-1 accuracy (%)")
        title = "Top-1 accuracy vs MACs"
    else:
        _log_scale(ax, "y", points["latency_ms"])
        ax.set_ylabel("latency, median (ms, log scale)")
        title = "No accuracy measured: latency vs MACs"
    if len(conclusive) < 2:
        title += " (no Pareto front: see the crossed cells)"
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    caption = (f"Every measured cell; circled: the Pareto front ({'higher top-1' if with_accuracy else 'lower latency'}"
               " at lower MACs). Error bars: " + ("std over seeds." if with_accuracy else "latency quartiles."))
    if not left_out.empty:
        why = ("a single seed (spread unknown) or top-1 at or below chance" if with_accuracy
               else f"noisy latency (IQR/median above {NOISY_REL_IQR:.0%})")
        caption += (f" Crossed: {len(left_out)} of {len(points)} cells with {why}, which the front does not use"
                    + ("; too few cells remain for a front." if len(conclusive) < 2 else "."))
    return Plot("pareto", title, caption, figure)


def front_eligible(points: pd.DataFrame, with_accuracy: bool) -> pd.Series:
    """Which cells a Pareto front may go through: not those the report marks as a smoke test or as noise, i.e.
    accuracy from a single seed (its spread is unknown) or at or below chance (100 / classes), or noisy latency.

    >>> cells = pd.DataFrame({"top1": [9.0, 40.0, 45.0], "top1_seeds": [3, 1, 3], "num_classes": [10, 10, None]})
    >>> front_eligible(cells, with_accuracy=True).tolist()
    [False, False, True]
    """
    if not with_accuracy:
        return ~(points["latency_rel_iqr"] > NOISY_REL_IQR)
    chance = 100.0 / pd.to_numeric(points.get("num_classes", pd.Series(np.nan, index=points.index)), errors="coerce")
    seeds = pd.to_numeric(points.get("top1_seeds", pd.Series(1, index=points.index)), errors="coerce")
    return (seeds >= 2) & ~(points["top1"] <= chance)


def sweep(cells: pd.DataFrame, config_keys: Sequence[str], axis: str) -> Plot | None:
    """MACs, params and latency against ``axis`` (``regions`` or ``input_size``): one line per setting and op
    measured at two values of the axis or more; the operators of the same setting without the axis (conv has no
    regions) as dashed level lines."""
    if axis not in cells:
        return None
    groups = [k for k in row_keys(cells, config_keys) if k != axis]
    by_series = _grouped(cells, [*groups, "op"])
    swept = {key: rows[_on_axis(rows[axis])] for key, rows in by_series.items()
             if rows[axis][_on_axis(rows[axis])].nunique() >= 2}
    panels = [q for q in QUANTITIES
              if q.column in ("macs_m", "params_m", "latency_ms") and cells[q.column].notna().any()]
    if not swept or not panels:
        return None
    swept_groups = list(dict.fromkeys(key[:-1] for key in swept))
    levels = {key: rows for key, rows in by_series.items() if rows[axis].isna().all()
              and any(agrees(key[:-1], group) for group in swept_groups)}
    label_keys = _differing(groups, swept_groups + [key[:-1] for key in levels])
    spatial = axis == "input_size"
    figure = Figure(figsize=(2.5 * len(panels) + 0.6, 3.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    x_values = sorted({v for rows in swept.values() for v in rows[axis]}, key=_size)
    for quantity, ax in zip(panels, axes):
        for key, rows in levels.items():
            line = _line_of(key[:-1], swept_groups)
            ax.axhline(rows[quantity.column].iloc[0], color=_colour(key[-1]), linewidth=1.0,
                       linestyle=LINESTYLES[(line + 1) % len(LINESTYLES)],
                       label=f"{_series_label(groups, key[:-1], label_keys, key[-1])} (no {axis})")
        for key, rows in swept.items():
            line = swept_groups.index(key[:-1])
            rows = rows.sort_values(axis, key=lambda column: column.map(_size))
            err = (np.vstack([rows["latency_ms"] - rows["latency_q1_ms"], rows["latency_q3_ms"] - rows["latency_ms"]])
                   if quantity.column == "latency_ms" else None)
            ax.errorbar(rows[axis].map(_size), rows[quantity.column], yerr=err, color=_colour(key[-1]),
                        marker=MARKERS[line % len(MARKERS)], markersize=4, capsize=2,
                        linestyle=LINESTYLES[line % len(LINESTYLES)],
                        label=_series_label(groups, key[:-1], label_keys, key[-1]))
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator([_size(v) for v in x_values]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([format_setting(v) for v in x_values])
        ax.set_xlabel("input size (pixels)" if spatial else "regions m")
        ax.set_ylabel(f"{quantity.name} ({quantity.unit})")
        if spatial:
            _log_scale(ax, "y", pd.concat([rows[quantity.column] for rows in [*swept.values(), *levels.values()]]))
        ax.grid(alpha=0.3)
    _legend_below(figure, axes[0])
    name = "input size" if spatial else "region count"
    names = [q.name for q in panels]
    title = f"{', '.join(names[:-1])} and {names[-1]} vs {name}" if len(names) > 1 else f"{names[0]} vs {name}"
    figure.suptitle(title, fontsize=9)
    caption = (f"Lines: cells measured at several {name}s; level lines: operators of the same setting without "
               f"{axis}. Latency error bars: quartiles of the samples."
               + (" Log scales: a locally connected layer's parameters grow with the input size, shared filters' "
                  "do not." if spatial else ""))
    return Plot(f"vs_{axis}", title, caption, figure)


def pareto_front(cost: np.ndarray, value: np.ndarray, *, higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both ``cost`` (lower is better) and ``value``.

    >>> pareto_front(np.array([1, 2, 3]), np.array([5, 4, 6]), higher_is_better=True)
    [0, 2]
    """
    sign = 1 if higher_is_better else -1
    front, best = [], -math.inf
    for index in sorted(range(len(cost)), key=lambda i: (cost[i], -sign * value[i])):
        if sign * value[index] > best:
            front.append(index)
            best = sign * value[index]
    return front


def _gain(rows: pd.DataFrame, op: str, quantity) -> tuple[np.ndarray, np.ndarray | None]:
    """The delta column of ``quantity`` for ``op`` and its error bar (see the module docstring): one half-width
    per point, or (below, above) from a paired interval."""
    if (op, quantity.delta_header) not in rows:
        return np.full(len(rows), np.nan), None
    gain = rows[(op, quantity.delta_header)].to_numpy(dtype=float)
    if quantity.spread is None:
        return gain, None
    low_header, high_header = quantity.interval_headers if quantity.paired else (None, None)
    if (op, low_header) in rows and rows[(op, low_header)].notna().any():
        low, high = (rows[(op, header)].to_numpy(dtype=float) for header in (low_header, high_header))
        return gain, np.nan_to_num(np.vstack([gain - low, high - gain]))
    spread_op = rows[(op, quantity.spread_header)].to_numpy(dtype=float)
    spread_conv = rows[(BASELINE_OP, quantity.spread_header)].to_numpy(dtype=float)
    if quantity.delta is POINTS:
        return gain, np.nan_to_num(np.hypot(spread_op, spread_conv))
    assert quantity.delta is RATIO
    relative = np.hypot(spread_op / rows[(op, quantity.header)].to_numpy(dtype=float),
                        spread_conv / rows[(BASELINE_OP, quantity.header)].to_numpy(dtype=float)) / 2
    return gain, np.nan_to_num(gain * relative)


def _grouped(frame: pd.DataFrame, keys: Sequence[str]) -> dict[tuple, pd.DataFrame]:
    """Rows of ``frame`` by their values of ``keys`` (columns, or index levels of the comparison table; unset
    values as None), in order of first appearance."""
    columns = frame.index.to_frame(index=False) if set(keys) <= set(frame.index.names) else frame
    positions: dict[tuple, list[int]] = {}
    for position, values in enumerate(zip(*(columns[k] for k in keys)) if keys else [()] * len(frame)):
        positions.setdefault(tuple(map(hashable_value, values)), []).append(position)
    return {group: frame.iloc[rows] for group, rows in positions.items()}


def _differing(keys: Sequence[str], groups: Sequence[tuple], exclude: Sequence[str] = ()) -> list[str]:
    """The keys whose values differ among ``groups`` (tuples of values of ``keys``): what a legend must name."""
    return [key for i, key in enumerate(keys)
            if key not in exclude and len({group[i] for group in groups}) > 1]


def _series_label(keys: Sequence[str], group: tuple, shown: Sequence[str], op: str) -> str:
    """``shufflenetv2 input_size=64 drconv``: the model by name, other shown keys as key=value."""
    parts = [format_setting(value) if key == "model" else f"{key}={format_setting(value)}"
             for key, value in zip(keys, group) if key in shown and not is_missing(value)]
    return " ".join([*parts, op])


def _line_of(group: tuple, swept_groups: list[tuple]) -> int:
    """The line style index of the swept group a level line belongs to."""
    return next((i for i, swept in enumerate(swept_groups) if agrees(group, swept)), 0)


def _legend_below(figure: Figure, ax: Axes) -> None:
    handles, labels = ax.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), frameon=False)


def _quantity(column: str):
    return next(q for q in QUANTITIES if q.column == column)


def _colour(op: str) -> str:
    if op in OP_COLOURS:
        return OP_COLOURS[op]
    return SPARE_COLOURS[sum(map(ord, op)) % len(SPARE_COLOURS)]


def _on_axis(values: pd.Series) -> pd.Series:
    """Which values have a place on a numeric axis: numbers and (H, W) sizes, not an unset key nor an option
    left at its default (its value is not stored)."""
    return values.map(lambda v: isinstance(v, (int, float, tuple)) and not isinstance(v, bool) and not is_missing(v))


def _size(value) -> float:
    """A numeric position for an axis value; an (H, W) input size sits at sqrt(H * W)."""
    return math.sqrt(math.prod(value)) if isinstance(value, tuple) else float(value)


def _log_scale(ax: Axes, which: str, values: pd.Series) -> None:
    """A log scale on axis ``which`` ("x" or "y") ticked at 1-2-5 steps with plain numbers (10, 20, 50, 100)."""
    getattr(ax, f"set_{which}scale")("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    finite = values[np.isfinite(values) & (values > 0)]
    if finite.empty:
        return
    low, high = finite.min(), finite.max()
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    ticks = [m * 10.0**e for e in decades for m in (1, 2, 5) if low <= m * 10.0**e <= high]
    if len(ticks) < 2:  # a narrow range: tick the values themselves, to two significant digits
        ticks = sorted({float(f"{value:.2g}") for value in finite})
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_locator(NullLocator())
