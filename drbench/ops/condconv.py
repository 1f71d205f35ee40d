"""Conditionally parameterised convolution (CondConv, Yang et al., NeurIPS 2019), registered as ``condconv``.

``y = ((a_1 W_1 + ... + a_E W_E) * x)`` with routing weights ``a = sigmoid(Linear(GlobalAvgPool(x)))``: the
experts are mixed once per sample, then each sample is convolved with its own kernel (the batch folded into the
convolution's groups), so the convolution costs what a standard one costs.

>>> import torch
>>> layer = CondConv2d(16, 16, 3, padding=1, groups=16, experts=4)   # a depthwise CondConv
>>> layer(torch.randn(2, 16, 8, 8)).shape
torch.Size([2, 16, 8, 8])
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from drbench.ops.functional import per_sample_conv2d
from drbench.ops.registry import register_op


class CondConv2d(nn.Module):
    """CondConv: ``experts`` kernels mixed per sample by sigmoid routing; supports groups (depthwise included).

    Init: each expert starts like an ``nn.Conv2d`` weight scaled by 1/sqrt(0.25 * experts): routing weights are
    about 0.5 at init, so the mixed kernel starts with the variance of the convolution it replaces.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        experts: int = 8,
    ):
        super().__init__()
        if experts < 1:
            raise ValueError(f"CondConv2d: experts must be >= 1, got {experts}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"CondConv2d: in_channels={in_channels} and out_channels={out_channels} must be divisible by "
                f"groups={groups}"
            )
        kernel_size = _pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = _pair(stride), _pair(padding), _pair(dilation), groups
        self.experts = experts
        self.routing = nn.Linear(in_channels, experts)
        self.weight = nn.Parameter(torch.empty(experts, out_channels, in_channels // groups, *kernel_size))
        fan_in = in_channels // groups * kernel_size[0] * kernel_size[1]
        std = 1.0 / math.sqrt(3 * fan_in) / math.sqrt(0.25 * experts)
        nn.init.normal_(self.weight, std=std)
        self.bias = nn.Parameter(torch.zeros(experts, out_channels)) if bias else None

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, experts) routing weights of each sample."""
        return torch.sigmoid(self.routing(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        routing = self.routing_weights(x)
        kernels = (routing @ self.weight.flatten(1)).view(batch, *self.weight.shape[1:])
        out = per_sample_conv2d(x, kernels, self.stride, self.padding, self.dilation, self.groups)
        if self.bias is not None:
            out = out + (routing @ self.bias)[:, :, None, None]
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, experts={self.experts}"
        )


@register_op("condconv", "CondConv: per-sample mixture of expert kernels", options=("experts",))
def build_condconv(in_channels: int, out_channels: int, kernel_size, **kwargs) -> CondConv2d:
    return CondConv2d(in_channels, out_channels, kernel_size, **kwargs)
