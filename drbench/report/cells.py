"""What a report is made of: the measured cells of one or more results stores, in display units.

:func:`load_results` reads results files or folders (``drbench.results``) and keeps, for each configuration
(``config_hash``), its latest record: a cell measured again (``--force``, a later commit) is shown once, as last
measured. The cells frame holds the record's configuration columns and these derived columns (NaN where a metric
was not measured)::

    macs_m, params_m              multiply-adds and parameters, millions
    latency_ms                    median forward latency, ms
    latency_q1_ms, latency_q3_ms  its quartiles (from the raw samples), latency_iqr_ms = q3 - q1
    latency_rel_iqr               IQR / median; above NOISY_REL_IQR the cell is noisy
    reference_rel_iqr             IQR / median of the reference kernel timed in turns with the forward: the
                                  machine's own noise while the cell was measured
    throughput                    images per second at the median latency
    train_step_ms, train_step_iqr_ms  median and IQR of a training step (forward, backward, optimiser), ms
    memory_mib                    peak forward memory beyond parameters and input, MiB
    top1, top1_std, top1_seeds    top-1 accuracy (%): mean and sample std over seeds, and the number of seeds
    top1_by_seed                  {seed: top-1} of the runs that finished (seeds pair operators: same data order)
    <metric>.shown                the headline of any other registered metric, in its declared unit
                                  (:func:`other_quantities`)

>>> results = load_results(["results/quick"])
>>> results.cells[["model", "width", "op", "macs_m", "latency_ms"]].head(2).values.tolist()
[['shufflenetv2', 0.5, 'conv', 1.0, 2.0], ['shufflenetv2', 0.5, 'condconv', 2.0, 4.0]]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from drbench.metric_registry import Quantity, quantities
from drbench.results import StoreWarning, flatten_record, read_records

BASELINE_OP = "conv"
"""The operator every other is compared against."""

OPTION_DEFAULT = "default"
"""The value shown for an operator option that a cell left at its default while other cells of its operator set
it (:func:`mark_option_defaults`)."""

DEDICATED = ("macs", "params", "latency", "latency.train", "memory", "accuracy")
"""Quantities the report derives columns of its own for (quartiles, throughput, seeds); any other registered
quantity gets its headline in its unit (``<name>.shown``)."""


def other_quantities() -> list[Quantity]:
    """The registered headline quantities without a dedicated column: a metric defined anywhere is reported."""
    return [q for q in quantities() if q.name not in DEDICATED and "." not in q.name]


def shown_column(item: Quantity) -> str:
    """The cells column of ``item``'s headline in its unit."""
    return f"{item.name}.shown"


@dataclass(frozen=True)
class Results:
    """Records read from results stores, and the cells a report shows.

    ``records``: every record, one row each (the frame of :func:`drbench.results.load`); ``cells``: the latest
    record of each configuration with the derived columns above; ``config_keys``: the configuration columns, in
    the order the records list them; ``unreadable``: messages about skipped lines.
    """

    sources: tuple[Path, ...]
    records: pd.DataFrame
    cells: pd.DataFrame
    config_keys: tuple[str, ...]
    unreadable: tuple[str, ...] = ()

    @property
    def suites(self) -> list[str]:
        return _distinct(self.records, "suite")

    def label(self, cell: pd.Series) -> str:
        """A cell's short name: model, width, op and the settings that vary among these cells."""
        return relative_label(cell, varying_keys(self.cells, self.config_keys))


def load_results(paths: Iterable[str | Path]) -> Results:
    """Read every record under ``paths`` (files or folders); ``ValueError`` when there is none."""
    sources = tuple(Path(p) for p in paths)
    records: list[dict] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StoreWarning)
        for source in sources:
            records += read_records(source)
    if not records:
        raise ValueError(f"no results records in {', '.join(map(str, sources)) or '(no paths given)'}")
    frame, config_keys = records_frame(records)
    unreadable = tuple(str(w.message) for w in caught if issubclass(w.category, StoreWarning))
    for message in unreadable:  # for the caller too (the CLI prints each), not only for the report's notice
        warnings.warn(message, StoreWarning, stacklevel=2)
    return Results(sources, frame, latest_cells(frame, config_keys), tuple(config_keys), unreadable)


def records_frame(records: Sequence[dict]) -> tuple[pd.DataFrame, list[str]]:
    """``drbench.results.load``'s frame of these records, configuration values kept as stored, and the
    configuration keys in the order the records list them."""
    config_keys = list(dict.fromkeys(key for record in records for key in record.get("config", {})))
    frame = pd.DataFrame([flatten_record(record) for record in records])
    for key in config_keys:  # as stored: pandas would turn the ints of a column with gaps (regions) into floats
        frame[key] = _objects([record.get("config", {}).get(key) for record in records], frame.index)
    return frame, config_keys


def latest_cells(frame: pd.DataFrame, config_keys: Sequence[str]) -> pd.DataFrame:
    """The latest record of each configuration, configuration values made hashable, derived columns added."""
    order = frame["started"].fillna("") if "started" in frame else pd.Series("", index=frame.index)
    latest = frame.assign(_order=order).sort_values("_order", kind="stable").drop(columns="_order")
    latest = latest.drop_duplicates("config_hash", keep="last").sort_index()
    for key in config_keys:
        if key in latest:
            latest[key] = _objects([hashable_value(v) for v in latest[key]], latest.index)
    latest = mark_option_defaults(latest, config_keys)
    return latest.assign(**derived_columns(latest)).reset_index(drop=True)


def mark_option_defaults(cells: pd.DataFrame, config_keys: Sequence[str]) -> pd.DataFrame:
    """``cells`` with :data:`OPTION_DEFAULT` where a cell leaves unset a key that other cells of its operator set.

    A key unset on every cell of an operator is one the operator does not take (conv has no ``regions``): it stays
    unset, and the tables place such a cell beside every setting of the key. A key that some cells of the operator
    set was left at the operator's default by the others, a setting of its own: the report must not show those
    cells as any of the settings measured (DRConv's default init beside ``init=independent``), nor hide them. The
    default is not named from today's registry, since a stored record may predate a change of default.

    >>> cells = pd.DataFrame({"op": ["conv", "drconv", "drconv"], "init": [None, None, "independent"]}, dtype=object)
    >>> mark_option_defaults(cells, ["op", "init"])["init"].tolist()
    [None, 'default', 'independent']
    """
    marked = cells.copy()
    for key in config_keys:
        if key == "op" or key not in marked:
            continue
        unset = marked[key].map(is_missing)
        ops_setting_it = set(marked.loc[~unset, "op"])
        at_default = unset & marked["op"].isin(ops_setting_it)
        if at_default.any():
            marked[key] = _objects([OPTION_DEFAULT if d else v for d, v in zip(at_default, marked[key])],
                                   marked.index)
    return marked


def derived_columns(frame: pd.DataFrame) -> dict[str, pd.Series]:
    """The display-unit columns of the module docstring, computed from a frame shaped like ``load()``'s."""
    forward = [{"median_s": m, "samples": s, "iqr_s": i} for m, s, i in
               zip(_numeric(frame, "latency"), _values_of(frame, "latency.samples"), _numeric(frame, "latency.iqr_s"))]
    latency, q1, q3 = _timing_ms(forward, frame.index)
    train, train_q1, train_q3 = _timing_ms(_values_of(frame, "latency.train"), frame.index)
    reference, reference_q1, reference_q3 = _timing_ms(_values_of(frame, "latency.reference"), frame.index)
    top1, top1_std, seeds, by_seed = _accuracy(frame)
    return {
        "macs_m": _numeric(frame, "macs") / 1e6,
        "params_m": _numeric(frame, "params") / 1e6,
        "latency_ms": latency,
        "latency_q1_ms": q1,
        "latency_q3_ms": q3,
        "latency_iqr_ms": q3 - q1,
        "latency_rel_iqr": (q3 - q1) / latency,
        "reference_rel_iqr": (reference_q3 - reference_q1) / reference,
        "throughput": _numeric(frame, "latency.throughput"),
        "train_step_ms": train,
        "train_step_iqr_ms": train_q3 - train_q1,
        "memory_mib": _numeric(frame, "memory") / 2**20,
        "top1": top1,
        "top1_std": top1_std,
        "top1_seeds": seeds,
        "top1_by_seed": by_seed,
        **{shown_column(q): _numeric(frame, q.name) * q.scale for q in other_quantities()},
    }


def relative_label(cell: pd.Series | dict, config_keys: Sequence[str]) -> str:
    """``shufflenetv2 0.5x drconv regions=8 input_size=64``: model, width, op, then the keys given that are set.

    A name among the cells of one report (``config_keys``: the settings that vary among them), where
    :func:`drbench.suite.label` names a cell on its own."""
    parts = [str(cell.get("model", "?")), f"{format_setting(cell.get('width', '?'))}x", str(cell.get("op", "?"))]
    parts += [f"{key}={format_setting(cell[key])}" for key in config_keys
              if key not in ("model", "width", "op") and key in cell and not is_missing(cell[key])]
    return " ".join(parts)


def format_setting(value: Any) -> str:
    """A configuration value as people write it: ``0.5``, ``112x96``, ``True``."""
    if isinstance(value, tuple):
        return "x".join(map(format_setting, value))
    return str(value)


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def varying_keys(cells: pd.DataFrame, config_keys: Sequence[str]) -> list[str]:
    """The configuration keys (besides ``op``) that take more than one value among the cells."""
    return [key for key in config_keys
            if key != "op" and key in cells and cells[key].map(hashable_value).dropna().nunique() > 1]


def _distinct(frame: pd.DataFrame, column: str) -> list:
    if column not in frame:
        return []
    return list(dict.fromkeys(v for v in frame[column].map(hashable_value) if not is_missing(v)))


def hashable_value(value: Any) -> Any:
    """Lists (an (H, W) input size, say) become tuples so that they can be grouped and compared; NaN becomes None."""
    if isinstance(value, list):
        return tuple(hashable_value(v) for v in value)
    return None if is_missing(value) else value


def _objects(values: list, index: pd.Index) -> pd.Series:
    return pd.Series(values, index=index, dtype=object)


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """``frame[column]`` as floats (NaN where absent or not a number)."""
    if column not in frame:
        return pd.Series(np.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[column], errors="coerce").astype(float)


def _values_of(frame: pd.DataFrame, column: str) -> list:
    return list(frame[column]) if column in frame else [None] * len(frame)


def _timing_ms(measurements: list, index: pd.Index) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Median and quartiles (ms) of stored latency measurements (dicts with ``median_s`` and raw ``samples``;
    without samples, quartiles at median -/+ IQR/2 from a stored ``iqr_s``, else at the median)."""
    rows = []
    for measurement in measurements:
        median = float(measurement.get("median_s") or math.nan) if isinstance(measurement, dict) else math.nan
        samples = measurement.get("samples") if isinstance(measurement, dict) else None
        if isinstance(samples, list) and samples:
            q1, q3 = np.quantile(np.asarray(samples, dtype=float), [0.25, 0.75])
        else:
            half = float(measurement.get("iqr_s") or 0.0) / 2 if isinstance(measurement, dict) else 0.0
            q1, q3 = median - half, median + half
        rows.append((median * 1e3, q1 * 1e3, q3 * 1e3))
    columns = np.asarray(rows, dtype=float).reshape(-1, 3).T
    return tuple(pd.Series(column, index=index, dtype=float) for column in columns)


def _accuracy(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series, pd.Series]:
    """Top-1 mean, sample std and seed count over the runs that finished (``accuracy.runs``), else the stored
    mean and std; and each cell's {seed: top-1} (None without runs). A single seed has no std (NaN, not 0)."""
    by_seed = [_top1_by_seed(runs) for runs in _values_of(frame, "accuracy.runs")]
    per_seed = [list(values.values()) for values in by_seed]
    mean = pd.Series([np.mean(v) if v else np.nan for v in per_seed], index=frame.index, dtype=float)
    std = pd.Series([np.std(v, ddof=1) if len(v) > 1 else np.nan for v in per_seed], index=frame.index, dtype=float)
    seeds = pd.Series([len(v) if v else np.nan for v in per_seed], index=frame.index, dtype=float)
    stored = seeds.isna()
    return (mean.where(~stored, _numeric(frame, "accuracy")), std.where(~stored, _numeric(frame, "accuracy.std")),
            seeds, _objects([values or None for values in by_seed], frame.index))


def _top1_by_seed(runs: Any) -> dict[int, float]:
    """{seed: top-1} of the finished runs of a stored ``accuracy.runs`` list (anything else: empty)."""
    if not isinstance(runs, list):
        return {}
    return {run["seed"]: float(run["top1"]) for run in runs
            if isinstance(run, dict) and run.get("status") == "ok" and isinstance(run.get("seed"), int)
            and isinstance(run.get("top1"), (int, float)) and math.isfinite(run["top1"])}
