"""drbench's own metrics: MACs, parameters, latency and memory (the trainer's ``accuracy`` is in
:mod:`drbench.measure.accuracy`). Each registers, with :func:`drbench.metric_registry.register_metric`, how to
measure it and the quantities it stores, so that every reader shows and judges them alike.

>>> from drbench.metric_registry import list_metrics
>>> [name for name in list_metrics() if name in ("macs", "params", "latency", "memory")]
['macs', 'params', 'latency', 'memory']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from drbench.config import BudgetSeconds, MinBlocks, RelativeIqr, WarmupCalls
from drbench.measure.memory import forward_peak_memory
from drbench.measure.timing import forward_latency, train_step_latency
from drbench.metric_registry import (
    MetricSettings, Quantity, RunContext, register_metric, relative_samples, samples,
)
from drbench.stats import decide_exact, decide_samples, decide_threshold

if TYPE_CHECKING:
    from drbench.suite import Cell

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


@register_metric("macs", settings=ComplexitySettings,
                 quantities=[Quantity("macs", unit="M", scale=1e-6, decide=decide_exact, column="MACs")])
def measure_macs(cell: Cell, settings: ComplexitySettings, context: RunContext) -> dict:
    """Multiply-adds per image (fvcore, drbench's operator handles) and the FLOPs the implementation executes."""
    counted = _complexity(cell).to_dict()
    result = {"value": counted["macs"], "executed_flops": counted["executed_flops"],
              "unsupported_ops": counted["unsupported_ops"]}
    if settings.by_layer:
        result["by_layer"] = counted["by_layer"]
    return result


@register_metric("params", quantities=[Quantity("params", unit="M", scale=1e-6, decide=decide_exact)])
def measure_params(cell: Cell, settings: MetricSettings, context: RunContext) -> dict:
    """Learnable parameters of the model."""
    return {"value": _complexity(cell).params}


@register_metric("latency", settings=LatencySettings, defaults_from="timing", quantities=[
    Quantity("latency", unit="ms", scale=1e3, read=samples("latency"), decide=decide_samples,
             relative=relative_samples("latency")),
    Quantity("latency.train", unit="ms", scale=1e3, read=samples("latency", "train"), decide=decide_samples,
             relative=relative_samples("latency", "train"), column="training step"),
])
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


@register_metric("memory", quantities=[Quantity("memory", unit="MiB", scale=2.0**-20, decide=decide_threshold)])
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


