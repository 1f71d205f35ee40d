"""Microbenchmarks: every registered operator, forward and forward + backward, beside ``nn.Conv2d`` at the same
shape. 1x1 convolutions, where the paper puts DRConv in classification networks:

- ``shufflenetv2``: B=32, C=O=116, 28x28 (ShuffleNetV2 1x, stage 2);
- ``mobilenetv2``: B=32, 64 -> 384, 14x14 (MobileNetV2 1.0, the expansion of the 14x14 stage).

DRConv runs with m=8 regions, once per ``region_conv2d`` implementation; CondConv with 8 experts.

pytest-benchmark times each case (the figure ``--benchmark-compare`` tracks across commits); each case's
``extra_info["ratio_vs_conv"]`` is its median over ``nn.Conv2d``'s from a separate timing of the two in turns
(A B A B ..., :func:`drbench.measure.timing.time_interleaved`) in the same process: on a shared machine absolute
times move with the load, ratios measured together much less.

    pytest benchmarks --benchmark-autosave
    pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:10%
    pytest benchmarks --benchmark-disable        # run every case once, untimed: a smoke test
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

from drbench.measure.timing import time_interleaved
from drbench.ops import create_conv, list_ops
from drbench.ops.functional import region_conv_impls

RATIO_BUDGET_S = 1.0
"""Seconds of interleaved timing behind each ratio_vs_conv."""


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: int

    def __str__(self) -> str:
        return f"B={self.batch} {self.in_channels}->{self.out_channels} {self.size}x{self.size} 1x1"


SHAPES = (Shape("shufflenetv2", 32, 116, 116, 28), Shape("mobilenetv2", 32, 64, 384, 14))

_VARIANTS: dict[str, list[dict[str, Any]]] = {
    "drconv": [{"regions": 8, "impl": impl} for impl in region_conv_impls()],
    "condconv": [{"experts": 8}],
}
CASES = [(op, options) for op in list_ops() for options in _VARIANTS.get(op, [{}])]


def forward(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """Inference: eval mode, no autograd."""
    layer.eval()

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return layer(x)

    return call


def forward_backward(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """Training: the forward pass and the gradients of the weights and of the input (a layer inside a network)."""
    layer.train()
    x = x.detach().requires_grad_()
    grad = torch.randn_like(layer(x).detach())

    def call() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.autograd.backward(layer(x), grad)

    return call


MODES = {"forward": forward, "forward_backward": forward_backward}


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    op, options = case
    return op + "".join(f"-{value}" for key, value in options.items() if key == "impl")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.name)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_operator(benchmark, timed, device: torch.device, case: tuple[str, dict[str, Any]], shape: Shape,
                  mode: str) -> None:
    op, options = case
    if options.get("impl", "reference") not in region_conv_impls(device.type):
        pytest.skip(f"the {options['impl']} implementation does not run on {device.type}")
    torch.manual_seed(0)
    size = (shape.size, shape.size)
    layer = create_conv(op, shape.in_channels, shape.out_channels, 1, input_size=size, **options).to(device)
    x = torch.randn(shape.batch, shape.in_channels, *size, device=device)
    run = MODES[mode](layer, x)
    benchmark.group = f"{shape.name} {mode}"
    benchmark.extra_info.update(op=op, options=options, shape=str(shape), mode=mode, device=str(device))
    if op != "conv" and not benchmark.disabled:
        conv = MODES[mode](nn.Conv2d(shape.in_channels, shape.out_channels, 1).to(device), x)
        both = time_interleaved({"op": run, "conv": conv}, device=device, budget_s=RATIO_BUDGET_S, warmup=1,
                                min_blocks=3)
        benchmark.extra_info["ratio_vs_conv"] = both["op"].median / both["conv"].median
    benchmark(timed(run))
