"""Metric registry: what a suite's ``metrics:`` section can name, and the built-in metrics.

A metric is a function of one cell, registered with its settings model::

    class LatencySettings(BaseModel):            # validated from the suite's `metrics: {latency: {...}}`
        model_config = ConfigDict(extra="forbid", strict=True)
        budget_s: float
        ...

    @register_metric("latency", settings=LatencySettings, defaults_from="timing")
    def measure_latency(cell: Cell, settings: LatencySettings, context: RunContext) -> dict:
        model, x = cell.build_model(), cell.example_input()
        ...
        return {"value": median_seconds, "samples": [...], ...}

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

A module that registers a metric must be imported before suites are loaded (the built-in ones register here, and
the trainer registers ``accuracy``).

>>> sorted(list_metrics())
['accuracy', 'latency', 'macs', 'memory', 'params']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from pydantic import BaseModel, ConfigDict

from drbench.config import BudgetSeconds, Config, MinBlocks, RelativeIqr, WarmupCalls
from drbench.measure.memory import forward_peak_memory
from drbench.measure.timing import forward_latency, train_step_latency

if TYPE_CHECKING:
    from drbench.suite import Cell

MetricFunction = Callable[["Cell", Any, "RunContext"], dict]


class MetricSettings(BaseModel):
    """Base of metric settings models: unknown keys and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    function: MetricFunction
    settings: type[BaseModel]
    defaults_from: str | None
    description: str


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
) -> Callable[[MetricFunction], MetricFunction]:
    """Register ``function(cell, settings, context) -> dict`` as metric ``name`` (see the module docstring)."""

    def decorator(function: MetricFunction) -> MetricFunction:
        if name in _REGISTRY:
            raise ValueError(f"metric {name!r} is already registered")
        summary = description or (function.__doc__ or "").strip().splitlines()[0]
        _REGISTRY[name] = MetricSpec(name, function, settings, defaults_from, summary)
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


# Built-in metrics -----------------------------------------------------------------------------------------------


class ComplexitySettings(MetricSettings):
    by_layer: bool = False  # also store the per-layer breakdown


class LatencySettings(MetricSettings):
    """Defaults from ``[timing]`` in drbench.toml; ``training`` adds the latency of a training step."""

    budget_s: BudgetSeconds
    warmup: WarmupCalls
    min_blocks: MinBlocks
    target_rel_iqr: RelativeIqr
    training: bool = False


_complexity_cache: dict[str, Any] = {}


def _complexity(cell: Cell):
    """fvcore's count for ``cell`` at batch size 1 (MACs per image, the papers' convention), memoised per cell
    so that ``macs`` and ``params`` share one trace."""
    from drbench.measure.complexity import complexity

    key = cell.config_hash()
    if key not in _complexity_cache:
        counted = cell.model_copy(update={"device": "cpu", "dtype": "float32"})
        _complexity_cache.clear()
        _complexity_cache[key] = complexity(counted.build_model(), cell.input_size, batch_size=1)
    return _complexity_cache[key]


@register_metric("macs", settings=ComplexitySettings)
def measure_macs(cell: Cell, settings: ComplexitySettings, context: RunContext) -> dict:
    """Multiply-adds per image (fvcore, drbench's operator handles) and the FLOPs the implementation executes."""
    counted = _complexity(cell).to_dict()
    result = {"value": counted["macs"], "executed_flops": counted["executed_flops"],
              "unsupported_ops": counted["unsupported_ops"]}
    if settings.by_layer:
        result["by_layer"] = counted["by_layer"]
    return result


@register_metric("params")
def measure_params(cell: Cell, settings: MetricSettings, context: RunContext) -> dict:
    """Learnable parameters of the model."""
    return {"value": _complexity(cell).params}


@register_metric("latency", settings=LatencySettings, defaults_from="timing")
def measure_latency(cell: Cell, settings: LatencySettings, context: RunContext) -> dict:
    """Forward latency in eval mode under inference_mode (and optionally a training step), raw samples kept, each
    timed in turns with drbench's reference kernel (whose samples :mod:`drbench.compare` divides by)."""
    timing = settings.model_dump(exclude={"training"})
    model, example = cell.build_model(), cell.example_input()
    forward = forward_latency(model, example, device=cell.torch_device, reference=True, **timing)
    result = {"value": forward.median, **forward.to_dict()}
    if settings.training:
        targets = torch.zeros(cell.batch_size, dtype=torch.long, device=cell.torch_device)
        context.status("latency (training step)")
        result["train"] = train_step_latency(model, example, targets, device=cell.torch_device, reference=True,
                                             **timing).to_dict()
    return result


@register_metric("memory")
def measure_memory(cell: Cell, settings: MetricSettings, context: RunContext) -> dict:
    """Peak memory of one forward pass beyond parameters and input (see drbench.measure.memory)."""
    model, example = cell.build_model(), cell.example_input()
    peak = forward_peak_memory(model, example)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "value": peak.peak_bytes,
        **peak.to_dict(),
        "param_bytes": param_bytes,
        "input_bytes": example.numel() * example.element_size(),
    }


# The trainer registers ``accuracy``; importing it here makes the metric known wherever suites are read, with or
# without the CLI. It sits last because it imports this module's registry.
from drbench.measure import accuracy as _accuracy  # noqa: E402,F401
