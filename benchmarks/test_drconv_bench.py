"""DRConv against standard convolution where researchers measure it: whole models and whole ``DRConv2d`` layers.

Every figure is a ratio to the same model or layer built with ``nn.Conv2d``, measured in one process, in turns
(:func:`drbench.measure.timing.time_interleaved`, median of the per-round ratios). Targets, on the 2-core CPU (they
are recorded in ``extra_info``, not asserted: timing on a shared machine moves by tens of percent):

- width suite setting, batch 1, 224px, 1 thread, inference: ShuffleNetV2 1x and MobileNetV2 1x at most 1.5x;
- training step at 32px (``small_input``), batch 32, 2 threads: ShuffleNetV2 0.5x at most 3x, MobileNetV2 0.5x at
  most 3.5x;
- one ``DRConv2d`` (guide, generator and region convolution; m = 8) at the region_conv2d benchmark shapes,
  2 threads: 3x3 forward at most 1.5x, 1x1 forward at most 1.5x, 1x1 forward + backward at most 4x. Peak forward
  memory at most 1.5x input + output (asserted: it does not depend on the machine's load).

The bounds the design implies (README, "What DRConv costs"): a 1x1 layer's forward and backward need at least
(3 + m) / 3 of a convolution's multiply-adds (Eq. 7 needs every region's response at every position); at batch 1
a model also reads its generators' weights once per image.

    pytest benchmarks/test_drconv_bench.py -s          # one line per case
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn

from drbench.measure.memory import forward_peak_memory
from drbench.measure.timing import fixed_threads, paired_ratio, time_interleaved
from drbench.models import create_model
from drbench.ops import DRConv2d

RATIO_BUDGET_S = 6.0
"""Seconds of interleaved timing behind each ratio."""
MEMORY_TARGET = 1.5


@dataclass(frozen=True)
class ModelCase:
    model: str
    width: float
    batch: int
    size: int
    threads: int
    training: bool
    target: float

    def __str__(self) -> str:
        mode = "train" if self.training else "forward"
        return f"{self.model}-{self.width}x-B{self.batch}-{self.size}px-{self.threads}t-{mode}"


MODEL_CASES = (
    ModelCase("shufflenetv2", 1.0, 1, 224, 1, False, 1.5),
    ModelCase("mobilenetv2", 1.0, 1, 224, 1, False, 1.5),
    ModelCase("shufflenetv2", 0.5, 32, 32, 2, True, 3.0),
    ModelCase("mobilenetv2", 0.5, 32, 32, 2, True, 3.5),
)


@dataclass(frozen=True)
class LayerCase:
    name: str
    batch: int
    channels: int
    size: int
    kernel: int
    training: bool
    target: float

    def __str__(self) -> str:
        mode = "fwd+bwd" if self.training else "fwd"
        return f"{self.name}-B{self.batch}-C{self.channels}-{self.size}px-{mode}"


LAYER_CASES = (
    LayerCase("3x3", 16, 64, 28, 3, False, 1.5),
    LayerCase("1x1", 32, 116, 28, 1, False, 1.5),
    LayerCase("1x1", 32, 116, 28, 1, True, 4.0),
)


def forward_call(module: nn.Module, example: torch.Tensor) -> Callable[[], object]:
    module.eval()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return module(example)

    return run


def training_call(module: nn.Module, example: torch.Tensor, input_grad: bool = False) -> Callable[[], object]:
    """Forward, a loss (cross-entropy on a model's logits, the mean square of a layer's output), backward and an
    SGD step; ``input_grad``: the input's gradient too, as a layer inside a network needs."""
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    targets = torch.zeros(example.shape[0], dtype=torch.long)
    leaf = example.detach().requires_grad_(input_grad)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = module(leaf)
        loss = nn.functional.cross_entropy(out, targets) if out.dim() == 2 else out.square().mean()
        loss.backward()
        optimizer.step()

    return run


def ratio_to_conv(benchmark, drconv: Callable[[], object], conv: Callable[[], object], target: float) -> dict:
    both = time_interleaved({"drconv": drconv, "conv": conv}, budget_s=RATIO_BUDGET_S, warmup=2, min_blocks=5,
                            target_rel_iqr=0.0)
    info = benchmark.extra_info
    info.update(ratio_vs_conv=paired_ratio(both["drconv"], both["conv"]), target_vs_conv=target,
                drconv_median_s=both["drconv"].median, conv_median_s=both["conv"].median,
                rounds=len(both["drconv"].samples))
    return info


def report(case, info: dict) -> None:
    print(f"\n{case}: " + ", ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                                   for key, value in info.items()))


@pytest.mark.parametrize("case", MODEL_CASES, ids=str)
def test_model(benchmark, case: ModelCase) -> None:
    benchmark.group = f"drconv model {case}"
    with fixed_threads(case.threads):
        options = dict(num_classes=10, input_size=32, small_input=True) if case.training else {}
        torch.manual_seed(0)
        example = torch.randn(case.batch, 3, case.size, case.size)
        call = training_call if case.training else forward_call
        drconv = call(create_model(case.model, case.width, "drconv", regions=8, **options), example)
        conv = call(create_model(case.model, case.width, "conv", **options), example)
        if not benchmark.disabled:
            report(case, ratio_to_conv(benchmark, drconv, conv, case.target))
        benchmark(drconv)


@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
def test_layer(benchmark, case: LayerCase) -> None:
    benchmark.group = f"drconv layer {case}"
    padding = case.kernel // 2
    torch.manual_seed(0)
    example = torch.randn(case.batch, case.channels, case.size, case.size)
    drconv_layer = DRConv2d(case.channels, case.channels, case.kernel, padding=padding, regions=8)
    conv_layer = nn.Conv2d(case.channels, case.channels, case.kernel, padding=padding)
    def call(module: nn.Module) -> Callable[[], object]:
        return training_call(module, example, input_grad=True) if case.training else forward_call(module, example)

    with fixed_threads(2):
        drconv, conv = call(drconv_layer), call(conv_layer)
        info = benchmark.extra_info
        if not benchmark.disabled:
            ratio_to_conv(benchmark, drconv, conv, case.target)
        if not case.training:
            with torch.inference_mode():
                peak = forward_peak_memory(drconv_layer, example).peak_bytes
            info["peak_memory_vs_in_out"] = peak / (2 * example.numel() * example.element_size())
        report(case, info)
        benchmark(drconv)
    if not case.training:
        assert info["peak_memory_vs_in_out"] <= MEMORY_TARGET
