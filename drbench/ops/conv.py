"""Standard convolution, registered as ``conv``: ``nn.Conv2d`` itself, the baseline of every comparison."""

from __future__ import annotations

import torch.nn as nn

from drbench.ops.registry import register_op


@register_op("conv", "standard convolution (nn.Conv2d)")
def build_conv(in_channels: int, out_channels: int, kernel_size, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs)
