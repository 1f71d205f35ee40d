"""Issue 14's first table, measured again: one DRConv2d 1x1 layer (m = 8) against nn.Conv2d at the shapes the issue
named, in turns in one process (4 s of timing each), with the BLAS the compiled kernels call.

    .venv/bin/python notes/issue14_layers.py                                          # this VM: Haswell kernels
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python notes/issue14_layers.py   # the CPU's own kernels

Needs a quiet machine, like every timing here (notes/verify17.sh prints the host's noise first).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

from drbench.measure.timing import fixed_threads, paired_ratio, time_interleaved
from drbench.ops import DRConv2d
from drbench.ops.region_conv_cpu import blas

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from test_drconv_bench import forward_call, training_call  # noqa: E402  (the benchmarks' own callables)


def training_step(module: nn.Module, x: torch.Tensor):
    """Forward, backward (the input's gradient too, as inside a network) and an SGD step."""
    return training_call(module, x, input_grad=True)


CASES = (  # name, batch, channels, size, what to time, threads
    ("1x1, B1, C=O=116, 28x28, fwd", 1, 116, 28, forward_call, 1),
    ("1x1, B1, C=O=464, 7x7, fwd", 1, 464, 7, forward_call, 1),
    ("1x1, B32, C=O=48, 8x8, fwd+bwd", 32, 48, 8, training_step, 2),
    ("1x1, B32, C=O=96, 4x4, fwd+bwd", 32, 96, 4, training_step, 2),
)


def main() -> None:
    print(f"compiled kernels' BLAS: {blas()}")
    for name, batch, channels, size, call, threads in CASES:
        torch.manual_seed(0)
        x = torch.randn(batch, channels, size, size)
        with fixed_threads(threads):
            timed = time_interleaved({"drconv": call(DRConv2d(channels, channels, 1, regions=8), x),
                                      "conv": call(nn.Conv2d(channels, channels, 1), x)},
                                     budget_s=4.0, warmup=3, min_blocks=5, target_rel_iqr=0.0)
        print(f"{name}, {threads} thread(s): conv {timed['conv'].median * 1e3:.3f} ms, "
              f"drconv {timed['drconv'].median * 1e3:.3f} ms, ratio {paired_ratio(timed['drconv'], timed['conv']):.2f}")


if __name__ == "__main__":
    main()
