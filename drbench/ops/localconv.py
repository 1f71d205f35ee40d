"""Local (locally connected) convolution, registered as ``local``: one unshared filter per output position.

The paper's Eq. 2. Its parameters grow with the spatial size, which is why it needs ``input_size`` when built.

>>> import torch
>>> layer = LocalConv2d(8, 16, 3, padding=1, input_size=(6, 6))
>>> layer(torch.randn(2, 8, 6, 6)).shape
torch.Size([2, 16, 6, 6])
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from drbench.ops.region_conv_base import conv_output_size
from drbench.ops.registry import register_op


class LocalConv2d(nn.Module):
    """Locally connected convolution over a fixed ``input_size`` (H, W); supports groups.

    Weight: (H'W', groups, C/groups * kh * kw, O/groups), one filter per output position, laid out so that the
    forward is one batched matrix product over positions with contiguous operands (an einsum over the natural
    (H'W', O, C*kh*kw) layout ran 12x slower on CPU). Bias (O, H', W') is unshared too.
    Init: each position's filter as ``nn.Conv2d`` initialises its weight, so the layer starts with a conv's variance.
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
        input_size: tuple[int, int] | int | None = None,
    ):
        super().__init__()
        if input_size is None:
            raise ValueError("LocalConv2d needs input_size=(H, W), the spatial size of its input")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"LocalConv2d: in_channels={in_channels} and out_channels={out_channels} must be divisible by "
                f"groups={groups}"
            )
        kernel_size = _pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = _pair(stride), _pair(padding), _pair(dilation), groups
        self.input_size = _pair(input_size)
        self.output_size = conv_output_size(self.input_size, kernel_size, self.stride, self.padding, self.dilation)
        if min(self.output_size) < 1:
            raise ValueError(f"LocalConv2d: kernel {kernel_size} does not fit input_size {self.input_size}")
        positions = self.output_size[0] * self.output_size[1]
        fan_in = in_channels // groups * kernel_size[0] * kernel_size[1]
        self.weight = nn.Parameter(torch.empty(positions, groups, fan_in, out_channels // groups))
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        self.bias = nn.Parameter(torch.empty(out_channels, *self.output_size).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"LocalConv2d was built for input size {self.input_size}, got {tuple(x.shape[-2:])}"
            )
        batch = x.shape[0]
        positions, groups, fan_in, group_out = self.weight.shape
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, C*kh*kw, L)
        patches = patches.view(batch, groups, fan_in, positions).permute(3, 1, 0, 2).reshape(-1, batch, fan_in)
        out = torch.bmm(patches, self.weight.view(-1, fan_in, group_out))  # (L*G, B, O/G)
        out = out.view(positions, groups, batch, group_out).permute(2, 1, 3, 0)
        out = out.reshape(batch, self.out_channels, *self.output_size)
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, input_size={self.input_size}"
        )


@register_op("local", "local convolution: one unshared filter per output position", needs_input_size=True)
def build_local(in_channels: int, out_channels: int, kernel_size, **kwargs) -> LocalConv2d:
    return LocalConv2d(in_channels, out_channels, kernel_size, **kwargs)
