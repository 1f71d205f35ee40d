"""Comparison tables: one row per configuration, one column group per operator, deltas against standard conv.

The rows are keyed by model and width plus every other configuration key that varies among the cells
(input_size, regions, ...). Operator options (``regions``, ``experts``) only exist on the cells of the operators
that take them; a cell is placed in every row that agrees with it on the keys it has, so the standard-conv cell
of (model, width) sits beside each DRConv region count of the same (model, width), and the deltas of a row compare
an operator with the standard convolution of that very row.

:func:`comparison_table` is numeric (the CSV form, flat column names ``<op> <quantity>``);
:func:`display_tables` turns it into one small string table per quantity for Markdown and HTML.

>>> from drbench.report.cells import load_results
>>> results = load_results(["results/quick"])
>>> table = comparison_table(results.cells, results.config_keys)
>>> table[("drconv", "Δ MACs vs conv (%)")].round(1).tolist()
[200.0, 20.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd

from drbench.report.cells import (
    BASELINE_OP, format_setting, hashable_value, is_missing, other_quantities, shown_column, varying_keys,
)
from drbench.stats import NOISY_REL_IQR, PAIRED_CONFIDENCE, paired_difference

ALWAYS_KEYS = ("model", "width")
"""Row keys shown even when they do not vary."""


@dataclass(frozen=True)
class Delta:
    """How an operator's value compares with standard convolution's in the same row."""

    header: str
    compute: Callable[[float, float], float]
    text: Callable[[float], str]


PERCENT = Delta("Δ {name} vs conv (%)", lambda value, conv: (value / conv - 1) * 100, lambda d: f"{d:+.1f}%")
RATIO = Delta("{name} (x conv)", lambda value, conv: value / conv, lambda d: f"{d:.2f}x")
POINTS = Delta("Δ {name} vs conv (points)", lambda value, conv: value - conv, lambda d: f"{d:+.2f} pts")


@dataclass(frozen=True)
class Quantity:
    """A column group of the tables: a cells column, its unit, its spread and its delta against conv."""

    column: str
    name: str
    unit: str
    decimals: int | None = None  # None: three significant digits
    spread: str | None = None
    spread_name: str | None = None
    delta: Delta | None = None
    paired: str | None = None  # a column of {seed: value}: the delta is then paired over seeds, with its interval

    @property
    def header(self) -> str:
        return f"{self.name} ({self.unit})" if self.unit else self.name

    @property
    def spread_header(self) -> str:
        return f"{self.name} {self.spread_name} ({self.unit})"

    @property
    def delta_header(self) -> str:
        assert self.delta is not None
        return self.delta.header.format(name=self.name)

    @property
    def interval_headers(self) -> tuple[str, str]:
        """The columns of the paired delta's confidence interval: low, high."""
        interval = f"{self.delta_header} {PAIRED_CONFIDENCE:.0%} CI"
        return f"{interval} low", f"{interval} high"

    @property
    def verdict_header(self) -> str:
        return f"{self.name} vs conv: verdict"


QUANTITIES = (
    Quantity("macs_m", "MACs", "M", delta=PERCENT),
    Quantity("params_m", "params", "M", delta=PERCENT),
    Quantity("latency_ms", "latency", "ms", spread="latency_iqr_ms", spread_name="IQR", delta=RATIO),
    Quantity("throughput", "throughput", "img/s"),
    Quantity("train_step_ms", "training step", "ms", spread="train_step_iqr_ms", spread_name="IQR", delta=RATIO),
    Quantity("memory_mib", "memory", "MiB"),
    Quantity("top1", "top-1", "%", decimals=2, spread="top1_std", spread_name="std", delta=POINTS,
             paired="top1_by_seed"),
)


def report_quantities() -> tuple[Quantity, ...]:
    """:data:`QUANTITIES`, then the headline of every other registered metric in its unit."""
    return QUANTITIES + tuple(Quantity(shown_column(q), q.column or q.name, q.unit) for q in other_quantities())


def row_keys(cells: pd.DataFrame, config_keys: Sequence[str]) -> list[str]:
    """Model and width, then every other configuration key that varies (``op`` is the column group)."""
    varying = varying_keys(cells, config_keys)
    return [key for key in config_keys if key in cells and (key in ALWAYS_KEYS or key in varying)]


def operators(cells: pd.DataFrame) -> list[str]:
    """The operators measured, standard conv first, the others in the order they were measured."""
    ops = list(dict.fromkeys(cells["op"]))
    return sorted(ops, key=lambda op: op != BASELINE_OP)


def table_rows(cells: pd.DataFrame, keys: Sequence[str]) -> list[tuple[tuple, dict[str, int]]]:
    """Each row's key values and, per operator, the index of the cell shown in it (sorted by the keys).

    A cell leaves a key unset (None) when its operator does not take it; such a partial row is dropped when a
    fuller row agrees with it on every key it sets, and the cell then appears in that fuller row. Where two cells
    of one operator fit a row, the one that sets more keys is shown.
    """
    key_values = [tuple(map(hashable_value, row)) for row in cells[list(keys)].itertuples(index=False)]
    candidates = list(dict.fromkeys(key_values))
    rows = [row for row in candidates if not any(other != row and agrees(row, other) for other in candidates)]
    by_specificity = sorted(zip(cells.index, cells["op"], key_values),
                            key=lambda item: sum(not is_missing(v) for v in item[2]))
    placed = []
    for row in sorted(rows, key=_row_sorter(cells, keys)):
        placed.append((row, {op: index for index, op, values in by_specificity if agrees(values, row)}))
    return placed


def comparison_table(cells: pd.DataFrame, config_keys: Sequence[str]) -> pd.DataFrame:
    """Numeric table: index = row keys, columns = (operator, quantity header); spreads and deltas included.

    Only quantities measured in at least one cell appear; deltas appear for operators other than conv when conv
    was measured.
    """
    ok = cells[cells["status"] == "ok"] if "status" in cells else cells
    if ok.empty:
        return pd.DataFrame()
    keys = row_keys(ok, config_keys)
    ops = operators(ok)
    quantities = [q for q in report_quantities() if q.column in ok and ok[q.column].notna().any()]
    index, data = [], []
    for row, members in table_rows(ok, keys):
        index.append(row)
        values: dict[tuple[str, str], float] = {}
        for op in ops:
            cell = ok.loc[members[op]] if op in members else None
            conv = ok.loc[members[BASELINE_OP]] if BASELINE_OP in members else None
            for quantity in quantities:
                values.update(_quantity_columns(op, quantity, cell, conv, BASELINE_OP in ops))
        data.append(values)
    # object levels: a key unset on some rows (regions on conv's) must keep its integers, not become floats
    levels = [pd.Index([row[i] for row in index], dtype=object) for i in range(len(keys))]
    table = pd.DataFrame(data, index=pd.MultiIndex.from_arrays(levels, names=keys))
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["op", "quantity"])
    return table


def flat_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The comparison table with ``<op> <quantity>`` column names and the keys as columns: the CSV form."""
    flat = table.copy()
    flat.columns = [f"{op} {quantity}" for op, quantity in table.columns]
    return flat.reset_index()


def display_tables(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One string table per measured quantity: key columns, then per operator its value and its delta.

    Latency reads ``median (IQR x.x)`` with ``*`` on noisy cells (IQR/median above 10%), accuracy
    ``mean ± std``; a missing value is ``–``. Rows and operators without any value of the quantity are left out.
    """
    keys = [pd.Series(table.index.get_level_values(k), name=k).map(_key_text) for k in table.index.names]
    shown = {}
    ops = list(dict.fromkeys(table.columns.get_level_values("op")))
    for quantity in report_quantities():
        if (ops[0], quantity.header) not in table.columns:
            continue
        values = table.xs(quantity.header, axis=1, level="quantity")
        measured_rows = values.notna().any(axis=1).to_numpy()
        columns = {}
        for op in (op for op in ops if values[op].notna().any()):
            columns[op] = [_value_text(quantity, table, op, i) for i in range(len(table))]
            if quantity.delta is not None and (op, quantity.delta_header) in table.columns:
                columns[f"{op} vs conv"] = [_delta_text(quantity, table, op, i) for i in range(len(table))]
        shown[quantity.header] = pd.concat([*keys, pd.DataFrame(columns)], axis=1)[measured_rows].reset_index(drop=True)
    return shown


def _quantity_columns(op: str, quantity: Quantity, cell: pd.Series | None, conv: pd.Series | None,
                      has_conv: bool) -> dict[tuple[str, str], float]:
    value = _number(cell, quantity.column)
    columns = {(op, quantity.header): value}
    if quantity.spread is not None:
        columns[(op, quantity.spread_header)] = _number(cell, quantity.spread)
    if quantity.delta is not None and has_conv and op != BASELINE_OP:
        baseline = _number(conv, quantity.column)
        valid = not (math.isnan(value) or math.isnan(baseline) or baseline == 0)
        columns[(op, quantity.delta_header)] = quantity.delta.compute(value, baseline) if valid else math.nan
        if quantity.paired is not None:
            columns.update(_paired_columns(op, quantity, cell, conv))
    return columns


def _paired_columns(op: str, quantity: Quantity, cell: pd.Series | None,
                    conv: pd.Series | None) -> dict[tuple[str, str], float | str | None]:
    """The delta over seeds both cells share (replacing the difference of means), its interval and verdict."""
    low, high = quantity.interval_headers
    columns: dict[tuple[str, str], float | str | None] = {
        (op, low): math.nan, (op, high): math.nan, (op, quantity.verdict_header): None}
    values, baseline = (_mapping(side, quantity.paired) for side in (cell, conv))
    difference = paired_difference(values, baseline) if values and baseline else None
    if difference is not None:
        columns.update({(op, quantity.delta_header): difference.mean, (op, low): difference.low,
                        (op, high): difference.high, (op, quantity.verdict_header): difference.verdict})
    return columns


def _mapping(cell: pd.Series | None, column: str) -> dict:
    value = None if cell is None or column not in cell else cell[column]
    return value if isinstance(value, dict) else {}


def _number(cell: pd.Series | None, column: str) -> float:
    if cell is None or column not in cell or is_missing(cell[column]):
        return math.nan
    return float(cell[column])


def agrees(partial: tuple, full: tuple) -> bool:
    """Every key set in ``partial`` has the same value in ``full``."""
    return all(is_missing(p) or p == f for p, f in zip(partial, full))


def _row_sorter(cells: pd.DataFrame, keys: Sequence[str]) -> Callable[[tuple], tuple]:
    """Numeric keys ascending, others in the order first measured (a suite lists its models in its own order),
    unset values last."""
    first_seen = {key: {v: i for i, v in enumerate(dict.fromkeys(cells[key]))} for key in keys}

    def rank(key: str, value) -> tuple:
        if is_missing(value):
            return (2, 0)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (0, value)
        if isinstance(value, tuple):
            return (0, math.prod(value))
        return (1, first_seen[key].get(value, 0))

    return lambda row: tuple(rank(key, value) for key, value in zip(keys, row))


def _value_text(quantity: Quantity, table: pd.DataFrame, op: str, row: int) -> str:
    value = table[(op, quantity.header)].iloc[row]
    if math.isnan(value):
        return "–"
    number = (lambda v: f"{v:.{quantity.decimals}f}") if quantity.decimals is not None else significant
    if quantity.spread is None or math.isnan(spread := table[(op, quantity.spread_header)].iloc[row]):
        return number(value)
    if quantity.delta is POINTS:
        return f"{number(value)} ± {number(spread)}"
    noisy = "*" if value > 0 and spread / value > NOISY_REL_IQR else ""
    return f"{number(value)} ({quantity.spread_name} {significant(spread, 2)}){noisy}"


def significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits without exponent: 146, 10.9, 0.352."""
    if value == 0 or math.isnan(value) or math.isinf(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def _delta_text(quantity: Quantity, table: pd.DataFrame, op: str, row: int) -> str:
    """``+1.20 pts``; with a paired interval ``+1.20 pts (CI +0.40 to +2.00): better``."""
    assert quantity.delta is not None
    delta = table[(op, quantity.delta_header)].iloc[row]
    if math.isnan(delta):
        return "–"
    text = quantity.delta.text(delta)
    low_header, high_header = quantity.interval_headers
    if quantity.paired is None or (op, low_header) not in table.columns:
        return text
    verdict = table[(op, quantity.verdict_header)].iloc[row]
    low, high = table[(op, low_header)].iloc[row], table[(op, high_header)].iloc[row]
    interval = "" if math.isnan(low) else f" (CI {low:+.2f} to {high:+.2f})"
    return f"{text}{interval}: {verdict}" if isinstance(verdict, str) else text


def _key_text(value) -> str:
    return "–" if is_missing(value) else format_setting(value)
