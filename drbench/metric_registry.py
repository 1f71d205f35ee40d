"""The metric registry: what a suite's ``metrics:`` section can name, and everything a reader needs to know of each
metric's results, declared once where the metric is defined.

A metric is a function of one cell, registered with its settings model and the :class:`Quantity` (or quantities)
it stores::

    class EnergySettings(MetricSettings):          # validated from the suite's `metrics: {energy: {...}}`
        repeats: int = 10

    @register_metric("energy", settings=EnergySettings,
                     quantities=[Quantity("energy", unit="mJ", scale=1e3, decide=decide_threshold,
                                          column="energy")])
    def measure_energy(cell: Cell, settings: EnergySettings, context: RunContext) -> dict:
        ...
        return {"value": joules, "samples": [...]}

- ``cell`` (:class:`drbench.suite.Cell`) is the resolved configuration (model, width, op, op_options,
  input_size, placement, small_input, num_classes, batch_size, dtype, device, never ``auto``);
  ``cell.build_model(seed)`` and ``cell.example_input(seed)`` build what it describes.
- ``settings`` is an instance of the registered pydantic model. Fields that also exist in the ``drbench.toml``
  section named by ``defaults_from`` take their defaults from it (the suite overrides them); an unknown key or a
  wrong type in the suite is a suite error before anything runs.
- ``context`` (:class:`RunContext`) carries the effective config, the thread count and ``context.status(text)``,
  which shows progress within a long cell (epochs, seeds) in the run's progress bar.
- The function returns a JSON-able dict: ``"value"`` is the headline figure (it becomes the results column named
  after the metric; the other keys become ``<metric>.<key>`` columns) and raw data (samples, curves) go beside it.
  Raising an exception records the cell as an error; the suite goes on.
- Each :class:`Quantity` says how readers treat one figure of the results: its unit and scale (``drbench show``,
  ``report``, ``compare``, ``history``), which direction is better, where its observations are (the headline, raw
  samples, one figure per seed), the decision rule of :mod:`drbench.stats` that judges a change, and its report
  column. Without ``quantities`` a metric stores one unitless headline judged by the threshold.

This module is a leaf (it imports only drbench's config and statistics, nothing that builds models), so
that every reader can know the metrics without importing their implementations; a module that registers a metric
must be imported before suites are loaded or results are read (drbench's own register in :mod:`drbench.metrics`
and :mod:`drbench.measure.accuracy`, both imported by :mod:`drbench.suite`).

>>> import drbench.metrics  # registers drbench's own metrics
>>> format_value("latency", 0.0123), quantity("latency").higher_is_better
('12.3 ms', False)
>>> quantity("unregistered").unit, quantity("unregistered").decide is decide_threshold
('', True)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from drbench.config import Config
from drbench.stats import Decision, DecisionRule, decide_threshold

if TYPE_CHECKING:
    from drbench.suite import Cell

Reader = Callable[[Mapping[str, Any]], "list[float] | None"]
"""Where a quantity's observations are: ``read(record["metrics"])`` -> the observations, or None."""


# Readers: where a quantity's observations are in a record's metrics -----------------------------------------------


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
    """Reads the measurement at ``path`` relative to the reference kernel timed in turns with it: each sample over
    the reference's sample of the same round (as
    :attr:`~drbench.measure.timing.LatencyMeasurement.relative_samples`); None where no reference was timed."""

    def read(metrics: Mapping[str, Any]) -> list[float] | None:
        node = _measurement(metrics, path) or {}
        own, reference = node.get("samples"), (node.get("reference") or {}).get("samples")
        if not own or not reference:
            return None
        return [float(a) / float(b) for a, b in zip(own, reference)]

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


# Quantities: what readers know of each figure a metric stores --------------------------------------------------------


@dataclass(frozen=True)
class Quantity:
    """One figure a metric stores, as every reader treats it.

    ``name`` is the metric's name, or ``<metric>.<part>`` for a second figure (``latency.train``); ``scale`` turns
    the stored value (seconds, counts, bytes) into ``unit``; ``read`` finds the observations (default: the
    headline ``value``), ``decide`` judges a change between two sides' observations, ``centre`` summarises one side
    (median, or mean of seeds), and ``relative`` where the observations divided by the reference kernel's are,
    judged instead of the raw ones when both sides have them. ``column`` names the quantity in report tables
    (default: its name).
    """

    name: str
    unit: str = ""
    scale: float = 1.0
    higher_is_better: bool = False
    read: Reader | None = None
    decide: DecisionRule = decide_threshold
    centre: Callable[[Sequence[float]], float] = statistics.median
    relative: Reader | None = None
    column: str | None = None

    def observations(self, metrics: Mapping[str, Any]) -> list[float] | None:
        """This quantity's observations in one record's ``metrics``, or None when it has none."""
        return (self.read or headline(self.name))(metrics)

    def judge(self, baseline: Sequence[float], current: Sequence[float], threshold: float) -> Decision:
        return self.decide(baseline, current, threshold, self.higher_is_better)

    def format(self, value: float | None) -> str:
        """A stored value in this quantity's unit: ``12.3 ms``, ``41 M``, ``1,234 MiB``; ``-`` when missing."""
        if value is None or not math.isfinite(value):
            return "-"
        shown = value * self.scale
        return (f"{shown:,.0f} {self.unit}" if abs(shown) >= 1000 else f"{shown:.3g} {self.unit}").rstrip()


def quantity(name: str) -> Quantity:
    """The registered quantity ``name``; for a name no registered metric declares (an old record's metric), a
    unitless headline judged by the threshold."""
    return next((q for q in quantities() if q.name == name), None) or Quantity(name)


def quantities() -> list[Quantity]:
    """Every quantity of the registered metrics, in registration order."""
    return [q for spec in _REGISTRY.values() for q in spec.quantities]


def quantities_in(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The names of the quantities the records hold: registered ones in registration order, then the headlines of
    metrics no registered metric declares, by name."""
    found: set[str] = set()
    stored: set[str] = set()
    for record in records:
        metrics = record.get("metrics") or {}
        stored.update(metrics)
        found.update(q.name for q in quantities() if q.name.split(".")[0] in metrics
                     and q.observations(metrics) is not None)
    return [q.name for q in quantities() if q.name in found] + sorted(stored - set(_REGISTRY))


def format_value(name: str, value: float | None) -> str:
    """A stored value of quantity ``name`` in its unit (:meth:`Quantity.format`)."""
    return quantity(name).format(value)


# Metrics: the functions that measure a cell -------------------------------------------------------------------------


MetricFunction = Callable[["Cell", Any, "RunContext"], dict]


class MetricSettings(BaseModel):
    """Base of metric settings models: unknown keys and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: its function, settings model, ``drbench.toml`` section of defaults, one-line
    description and the quantities it stores."""

    name: str
    function: MetricFunction
    settings: type[BaseModel]
    defaults_from: str | None
    description: str
    quantities: tuple[Quantity, ...]


@dataclass(frozen=True)
class RunContext:
    """What a metric may use beyond its cell: the effective settings and a way to report progress."""

    config: Config
    threads: int
    status: Callable[[str], None] = field(default=lambda text: None)


_REGISTRY: dict[str, MetricSpec] = {}


def register_metric(
    name: str,
    *,
    settings: type[BaseModel] = MetricSettings,
    defaults_from: str | None = None,
    description: str = "",
    quantities: Sequence[Quantity] = (),
) -> Callable[[MetricFunction], MetricFunction]:
    """Register ``function(cell, settings, context) -> dict`` as metric ``name`` with the quantities it stores
    (default: one unitless headline named ``name``); see the module docstring."""
    declared = tuple(quantities) or (Quantity(name),)
    foreign = [q.name for q in declared if q.name.split(".")[0] != name]
    if foreign:
        raise ValueError(f"metric {name!r} declares quantities of another metric: {', '.join(foreign)}")

    def decorator(function: MetricFunction) -> MetricFunction:
        if name in _REGISTRY:
            raise ValueError(f"metric {name!r} is already registered")
        summary = description or (function.__doc__ or "").strip().splitlines()[0]
        _REGISTRY[name] = MetricSpec(name, function, settings, defaults_from, summary, declared)
        return function

    return decorator


def list_metrics() -> list[str]:
    """Names of the registered metrics, in registration order."""
    return list(_REGISTRY)


def get_metric(name: str) -> MetricSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; expected one of: {', '.join(_REGISTRY)}") from None


def resolve_settings(spec: MetricSpec, given: Mapping[str, Any], config: Config) -> BaseModel:
    """``spec``'s settings from the suite's ``given`` values over the defaults of its ``drbench.toml`` section.

    Raises pydantic's ``ValidationError`` for unknown keys or wrong types.
    """
    defaults: dict[str, Any] = {}
    if spec.defaults_from is not None:
        section = config.section(spec.defaults_from)
        shared = type(section).model_fields.keys() & spec.settings.model_fields.keys()
        defaults = {key: getattr(section, key) for key in shared}
    return spec.settings.model_validate({**defaults, **given})


def measure_cell(cell: Cell, metrics: Mapping[str, BaseModel], context: RunContext) -> dict[str, dict]:
    """Run each metric on ``cell`` in order; an exception propagates (the runner records it)."""
    results = {}
    for name, settings in metrics.items():
        context.status(name)
        results[name] = get_metric(name).function(cell, settings, context)
    return results
