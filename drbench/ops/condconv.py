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

from drbench.ops.region_conv_base import per_sample_conv2d
from drbench.ops.registry import register_op


CONDCONV_INITS = ("authors", "scaled")
"""How a :class:`CondConv2d`'s experts start: as convolutions (``"authors"``) or scaled down (``"scaled"``)."""


class CondConv2d(nn.Module):
    """CondConv: ``experts`` kernels mixed per sample by sigmoid routing; supports groups (depthwise included).

    Init (``init="authors"``, the default): each expert starts exactly as an ``nn.Conv2d`` weight (and bias), as in
    the reference implementations (timm's ``layers/cond_conv2d.py``, TensorFlow's EfficientNet-CondConv
    ``condconv_layers.py``, which initialise every expert with the convolution's own initialiser). ``"scaled"``
    (drbench before 0.3, kept for the init ablation) scales each expert down by 1/sqrt(0.25 * experts), so that
    the mix (routing weights about 0.5) starts with a convolution's variance.
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
        init: str = "authors",
    ):
        super().__init__()
        if experts < 1:
            raise ValueError(f"CondConv2d: experts must be >= 1, got {experts}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"CondConv2d: in_channels={in_channels} and out_channels={out_channels} must be divisible by "
                f"groups={groups}"
            )
        if init not in CONDCONV_INITS:
            raise ValueError(f"CondConv2d: init must be one of {CONDCONV_INITS}, got {init!r}")
        kernel_size = _pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = _pair(stride), _pair(padding), _pair(dilation), groups
        self.experts, self.init = experts, init
        self.routing = nn.Linear(in_channels, experts)
        self.weight = nn.Parameter(torch.empty(experts, out_channels, in_channels // groups, *kernel_size))
        self.bias = nn.Parameter(torch.empty(experts, out_channels)) if bias else None
        fan_in = in_channels // groups * kernel_size[0] * kernel_size[1]
        if init == "authors":
            for expert in range(experts):  # nn.Conv2d.reset_parameters, expert by expert
                nn.init.kaiming_uniform_(self.weight[expert], a=math.sqrt(5))
                if self.bias is not None:
                    nn.init.uniform_(self.bias[expert], -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        else:
            nn.init.normal_(self.weight, std=1.0 / math.sqrt(3 * fan_in) / math.sqrt(0.25 * experts))
            if self.bias is not None:
                nn.init.zeros_(self.bias)

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
            f"padding={self.padding}, groups={self.groups}, experts={self.experts}, init={self.init!r}"
        )


@register_op("condconv", "CondConv: per-sample mixture of expert kernels", options=("experts", "init"))
def build_condconv(in_channels: int, out_channels: int, kernel_size, **kwargs) -> CondConv2d:
    return CondConv2d(in_channels, out_channels, kernel_size, **kwargs)
