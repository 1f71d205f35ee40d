"""``region_conv2d`` implementations against ``F.conv2d`` at the same shape: the targets of the fast implementation.

Shapes (m = 8 regions, random guide, so the regions are about equal in size):

- ``1x1``: B=32, C=O=116, 28x28 (ShuffleNetV2 1x, stage 2). Targets for ``fast``: forward at most 2.0x conv,
  forward + backward at most 4.5x conv.
- ``3x3``: B=16, C=O=64, 28x28, padding 1. Target for ``fast``: forward at most 2.5x conv.

The targets are the CPU's (2 threads). Every implementation registered for the device runs: on CUDA the Triton
kernel too (``--bench-device cuda``), with ratios recorded and no target.

Each case's ``extra_info["ratio_vs_conv"]`` is the median, over rounds, of its time over ``F.conv2d``'s in the same
round (A B A B ..., :func:`drbench.measure.timing.time_interleaved`, 2 threads on CPU): on a shared machine absolute
times move with the load, ratios measured together much less. Forward cases also record
``extra_info["peak_memory_vs_in_out"]``: the most bytes the forward holds at once (output included, inputs
excluded) over the bytes of the input plus the output. On CPU it comes from ``torch.profiler``'s memory events, each
of which carries the allocator's running total of allocated bytes; on CUDA from ``torch.cuda.max_memory_allocated``.
The fast forward must stay within 2x (asserted); the reference holds all m outputs.

    OMP_WAIT_POLICY=PASSIVE pytest benchmarks/test_region_conv_bench.py -s    # -s: one line per case

On a machine shared with other busy processes, set ``OMP_WAIT_POLICY=PASSIVE``: with OpenMP's default, a thread
that reaches the end of a parallel region spins while its partner waits for a core, and an implementation made of
many parallel operations (the fast one: gathers, matmuls, scatters per chunk) loses several times more to that
than one convolution does.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from drbench.measure.timing import fixed_threads, paired_ratio, time_interleaved
from drbench.ops.functional import region_conv2d, region_conv_impls

THREADS = 2
RATIO_BUDGET_S = 3.0
"""Seconds of interleaved timing behind each ratio_vs_conv."""
MEMORY_TARGET = 2.0


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    channels: int
    out_channels: int
    size: int
    kernel: int
    padding: int
    regions: int = 8

    def __str__(self) -> str:
        return (f"B={self.batch} {self.channels}->{self.out_channels} {self.size}x{self.size} "
                f"{self.kernel}x{self.kernel} pad {self.padding} m={self.regions}")


SHAPES = (Shape("1x1", 32, 116, 116, 28, 1, 0), Shape("3x3", 16, 64, 64, 28, 3, 1))
TARGETS = {("1x1", "forward"): 2.0, ("1x1", "forward_backward"): 4.5, ("3x3", "forward"): 2.5}
"""Most time of the fast implementation over conv's, from the issue."""


@dataclass(frozen=True)
class Operands:
    x: torch.Tensor
    guide: torch.Tensor
    filters: torch.Tensor
    weight: torch.Tensor  # conv's, (O, C, k, k)


def make_operands(shape: Shape, device: torch.device) -> Operands:
    gen = torch.Generator().manual_seed(0)
    k, size = shape.kernel, shape.size

    def randn(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=gen).to(device)

    return Operands(
        x=randn(shape.batch, shape.channels, size, size),
        guide=randn(shape.batch, shape.regions, size, size),
        filters=randn(shape.batch, shape.regions, shape.out_channels, shape.channels, k, k) * 0.1,
        weight=randn(shape.out_channels, shape.channels, k, k) * 0.1,
    )


def forward(call: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return call(*inputs)

    return run


def forward_backward(call: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    """Forward, then the gradients of every input (as inside a network in training)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    grad = torch.randn_like(call(*leaves).detach())

    def run() -> None:
        torch.autograd.grad(call(*leaves), leaves, grad)

    return run


MODES = {"forward": forward, "forward_backward": forward_backward}


def region_conv_call(impl: str, shape: Shape, operands: Operands):
    def call(x, guide, filters):
        return region_conv2d(x, guide, filters, padding=shape.padding, impl=impl)

    return call, (operands.x, operands.guide, operands.filters)


def conv_call(shape: Shape, operands: Operands):
    def call(x, weight):
        return F.conv2d(x, weight, padding=shape.padding)

    return call, (operands.x, operands.weight)


def peak_allocated_bytes(run: Callable[[], object], device: torch.device) -> int:
    """The most bytes allocated at once while ``run`` executes (its result included), beyond those before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        prof.export_chrome_trace(path)
        with open(path) as stream:
            events = [e["args"] for e in json.load(stream)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.remove(path)
    totals = [event["Total Allocated"] for event in events]  # the running total after each allocation or free
    return max(totals) - (totals[0] - events[0]["Bytes"])


@pytest.fixture
def threads(device: torch.device):
    if device.type == "cuda":
        yield torch.get_num_threads()
        return
    with fixed_threads(THREADS) as count:
        yield count


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_conv2d(benchmark, timed, device, threads, shape: Shape, mode: str) -> None:
    """The baseline alone, so that pytest-benchmark's table and --benchmark-compare track it too."""
    benchmark.group = f"region_conv {shape.name} {mode}"
    benchmark.extra_info.update(shape=str(shape), mode=mode, device=str(device), threads=threads)
    benchmark(timed(MODES[mode](*conv_call(shape, make_operands(shape, device)))))


@pytest.mark.parametrize("impl", region_conv_impls())
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_region_conv(benchmark, timed, device, threads, shape: Shape, mode: str, impl: str) -> None:
    if impl not in region_conv_impls(device.type):
        pytest.skip(f"the {impl} implementation does not run on {device.type}")
    operands = make_operands(shape, device)
    run = MODES[mode](*region_conv_call(impl, shape, operands))
    benchmark.group = f"region_conv {shape.name} {mode}"
    target = TARGETS.get((shape.name, mode)) if impl == "fast" and device.type == "cpu" else None
    info = benchmark.extra_info
    info.update(shape=str(shape), mode=mode, impl=impl, device=str(device), threads=threads, target_vs_conv=target)
    if not benchmark.disabled:
        conv = MODES[mode](*conv_call(shape, operands))
        # The whole budget, not an early stop once both look steady: a ratio of 5 rounds moved by 30% between runs.
        both = time_interleaved({"op": run, "conv": conv}, device=device, budget_s=RATIO_BUDGET_S, warmup=1,
                                min_blocks=5, target_rel_iqr=0.0)
        info.update(ratio_vs_conv=paired_ratio(both["op"], both["conv"]),
                    op_median_s=both["op"].median, conv_median_s=both["conv"].median, rounds=len(both["op"].samples))
    if mode == "forward":
        out_numel = shape.batch * shape.out_channels * shape.size * shape.size
        in_out = operands.x.element_size() * (operands.x.numel() + out_numel)
        info["peak_memory_vs_in_out"] = peak_allocated_bytes(run, device) / in_out
    print(f"\n{impl:9s} {shape} {mode}: " + ", ".join(
        f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in info.items() if key in ("ratio_vs_conv", "target_vs_conv", "peak_memory_vs_in_out")))
    benchmark(timed(run))
    if impl != "reference" and mode == "forward":
        assert info["peak_memory_vs_in_out"] <= MEMORY_TARGET
