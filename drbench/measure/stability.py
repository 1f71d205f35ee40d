"""Instruments of a training run's stability: what each optimiser step moves, and how far the network's function moves.

:class:`StabilityTrace` watches a model during :func:`drbench.measure.accuracy.train` (``drbench train --trace``)
and records, every ``every`` steps, a :class:`StepTrace`:

- the loss and learning rate of the step, and the norm of its gradient over all parameters as the backward pass
  left it (before any clipping: the trainer calls :meth:`StabilityTrace.before_update` first);
- **update-to-weight ratios** ``||w_after - w_before|| / ||w_before||`` of the weight tensors (biases and norms, which
  start at 0 or 1, are left out), the largest per parameter role (:func:`parameter_role`), and the name of the
  tensor moved most: a healthy step moves a weight by about 1e-3 to 1e-2 of itself;
- on a fixed **probe batch** run through the model before and after the step (BatchNorm on batch statistics, its
  running statistics untouched): the relative change of each traced layer's output and, for region-aware layers
  (those with ``last_mask``), the fraction of positions whose region changed (**mask churn**).

Where conv's outputs move about as much as its weights, a layer whose region assignment flips at many positions
moves its output by much more: that difference is what :func:`summarize_trace` reports, with the step where the
loss first rose above its starting level.

>>> import torch
>>> from drbench.ops.drconv import DRConv2d
>>> model = torch.nn.Sequential(DRConv2d(3, 8, 3, padding=1, regions=4), torch.nn.BatchNorm2d(8))
>>> trace = StabilityTrace(torch.randn(4, 3, 8, 8))
>>> trace.start(model)
>>> trace.before_update(model)
>>> with torch.no_grad():
...     _ = model[0].guide.weight.add_(0.01)
>>> step = trace.after_update(model, step=1, loss=2.3, lr=0.1)
>>> sorted(step.update_ratio), 0 <= step.mask_churn <= 1
(['generator', 'guide'], True)
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from drbench.data import ImageDataset, Normalization

PROBE_IMAGES = 64

ROLES = ("guide", "generator", "routing")
"""Parameter roles told apart (by name, :func:`parameter_role`); every other weight is ``"weights"``."""


@dataclass(frozen=True)
class StepTrace:
    """One traced optimiser step (``step`` counts from 1). Output and churn figures are means and maxima over the
    traced layers; churn is None in a model without region-aware layers."""

    step: int
    lr: float
    loss: float
    grad_norm: float | None  # None where no parameter had a gradient
    update_ratio: dict[str, float]
    most_moved: str
    output_change: float
    output_change_max: float
    output_change_layer: str
    mask_churn: float | None
    mask_churn_max: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parameter_role(name: str) -> str:
    """The role of a parameter from its qualified name.

    >>> parameter_role("stage2.0.block.0.0.guide.weight"), parameter_role("features.3.conv.weight")
    ('guide', 'weights')
    """
    parts = name.split(".")
    return next((role for role in ROLES if role in parts), "weights")


def traced_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose outputs are traced: region-aware layers (``last_mask``) and the other convolution-like
    operators with groups = 1, not counting those nested inside another traced layer (a DRConv's guide)."""
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in layers)
        region_aware = hasattr(type(module), "last_mask")
        dense_conv = isinstance(module, nn.Conv2d) and module.groups == 1
        if not inside and (region_aware or dense_conv):
            layers[name] = module
    return layers


class StabilityTrace:
    """Records a :class:`StepTrace` every ``every`` optimiser steps of a model; ``probe`` is a fixed, normalised
    input batch on the model's device. Call :meth:`start` once, then :meth:`before_update` and
    :meth:`after_update` around each ``optimizer.step()``."""

    def __init__(self, probe: torch.Tensor, every: int = 1):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.probe, self.every = probe, every
        self.steps: list[StepTrace] = []
        self._layers: dict[str, nn.Module] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._before_weights: dict[str, torch.Tensor] | None = None
        self._grad_norm: float | None = None
        self._before_probe: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._calls = 0

    @classmethod
    def on_dataset(cls, dataset: ImageDataset, device: str | torch.device = "cpu", every: int = 1,
                   images: int = PROBE_IMAGES) -> StabilityTrace:
        """A trace whose probe is the first ``images`` images of ``dataset``, normalised as training does."""
        return cls(Normalization.of(dataset)(dataset.images[:images]).to(device), every)

    def to_jsonl(self) -> str:
        """The traced steps, one JSON object per line."""
        return "".join(json.dumps(step.to_dict()) + "\n" for step in self.steps)

    def start(self, model: nn.Module) -> None:
        self._layers = traced_layers(model)
        for name, layer in self._layers.items():
            layer.register_forward_hook(self._recorder(name))

    def before_update(self, model: nn.Module) -> None:
        self._calls += 1
        if self._calls % self.every:
            return
        self._before_weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() > 1}
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self._grad_norm = float(torch.stack([g.detach().float().norm() for g in grads]).norm()) if grads else None
        self._before_probe = self._run_probe(model)

    def after_update(self, model: nn.Module, step: int, loss: float, lr: float) -> StepTrace | None:
        """The step's trace (also appended to :attr:`steps`), or None on a step that is not traced."""
        if self._before_weights is None:
            return None
        moved = {name: float((param.detach() - before).norm() / before.norm().clamp_min(1e-12))
                 for name, param in model.named_parameters()
                 if (before := self._before_weights.get(name)) is not None}
        ratios: dict[str, float] = {}
        for name, ratio in moved.items():
            role = parameter_role(name)
            ratios[role] = max(ratios.get(role, 0.0), ratio)
        after = self._run_probe(model)
        changes = {name: relative_change(self._before_probe[name][0], output) for name, (output, _) in after.items()}
        churns = [mask_churn(self._before_probe[name][1], mask) for name, (_, mask) in after.items()
                  if mask is not None]
        worst = max(changes, key=changes.get)
        trace = StepTrace(step, lr, loss, self._grad_norm, ratios, max(moved, key=moved.get),
                          statistics.fmean(changes.values()), changes[worst], worst,
                          statistics.fmean(churns) if churns else None, max(churns) if churns else None)
        self.steps.append(trace)
        self._before_weights = None
        return trace

    def _recorder(self, name: str):
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self._outputs[name] = output.detach()
        return record

    @torch.no_grad()
    def _run_probe(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Each traced layer's output and region mask on the probe, in training mode (the statistics training
        sees) but without dropout, leaving training exactly as it would be untraced: BatchNorm's running statistics
        and the random number generators are as they were (a dropout draw would change every later batch's)."""
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
        saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                 for m in norms]
        for m in norms:
            m.momentum = 0.0
        for m in dropouts:
            m.eval()
        devices = [self.probe.device] if self.probe.device.type == "cuda" else []
        try:
            self._outputs.clear()
            with torch.random.fork_rng(devices=devices):
                model(self.probe)
        finally:
            for m in dropouts:
                m.train()
            for m, (momentum, tracked) in zip(norms, saved):
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)
        return {name: (self._outputs[name], getattr(layer, "last_mask", None))
                for name, layer in self._layers.items() if name in self._outputs}


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """``||after - before|| / ||before||`` (0 when both are 0).

    >>> relative_change(torch.ones(4), torch.full((4,), 1.5))
    0.5
    """
    norm = float(before.norm())
    return float((after - before).norm()) / norm if norm > 0 else float(after.norm() > 0)


def mask_churn(before: torch.Tensor | None, after: torch.Tensor) -> float:
    """The fraction of positions whose region differs between two masks.

    >>> mask_churn(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 1], [3, 3]]))
    0.25
    """
    if before is None or before.shape != after.shape:
        return math.nan
    return float((before != after).float().mean())


def first_rise(losses: Sequence[float], window: int = 10) -> int | None:
    """The first index where the median loss of the last ``window`` steps exceeds that of the first ``window``: where
    training first went backwards for a while (a single noisy step does not count). None if it never did.

    >>> first_rise([2.3] * 10 + [2.2] * 10 + [2.5] * 10, window=5)
    22
    """
    if len(losses) < 2 * window:
        return None
    start = statistics.median(losses[:window])
    for end in range(2 * window, len(losses) + 1):
        if statistics.median(losses[end - window : end]) > start:
            return end - 1
    return None


def summarize_trace(steps: Sequence[StepTrace], window: int = 10) -> dict[str, Any]:
    """The figures of a trace that tell stable from chaotic training: the step where the loss first rose (see
    :func:`first_rise`), the largest update ratio of each role, and gradient norm, output change and churn over the
    first, middle and last tenths of the traced steps."""
    if not steps:
        return {}
    rise = first_rise([s.loss for s in steps], window)
    tenth = max(1, len(steps) // 10)
    phases = {"first": steps[:tenth], "middle": steps[len(steps) // 2 - tenth // 2:][:tenth], "last": steps[-tenth:]}
    roles = {role for s in steps for role in s.update_ratio}
    return {
        "loss_first_rises_at_step": None if rise is None else steps[rise].step,
        "peak_update_ratio": {role: max(s.update_ratio.get(role, 0.0) for s in steps) for role in sorted(roles)},
        **{figure: _phase_means(phases, figure) for figure in ("grad_norm", "output_change", "mask_churn")},
    }


def _phase_means(phases: dict[str, Sequence[StepTrace]], figure: str) -> dict[str, float | None]:
    """The mean of one :class:`StepTrace` figure over each phase's steps; None where the trace lacks it."""
    return {phase: statistics.fmean(getattr(s, figure) for s in part) if getattr(part[0], figure) is not None
            else None for phase, part in phases.items()}
