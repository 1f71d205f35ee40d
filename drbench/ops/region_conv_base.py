"""What the implementations of :func:`~drbench.ops.functional.region_conv2d` build on: the registry they join by
name, and the convolution math they share (:func:`conv_output_size` and :func:`per_sample_conv2d` serve the other
operators too).

It imports no other drbench module, so that every implementation can import it without importing another
implementation or :mod:`drbench.ops.functional`, which imports them all.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping, NamedTuple, Type

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

IntPair = int | tuple[int, int]


class RegionConvImpl(NamedTuple):
    """One registered implementation."""

    function: Type[torch.autograd.Function]
    runs_on: Callable[[str], bool]  # whether it can run here on tensors of a device type


_registered: dict[str, RegionConvImpl] = {}
REGISTERED: Mapping[str, RegionConvImpl] = MappingProxyType(_registered)
"""Name -> implementation, in registration order (read-only: implementations join by
:func:`register_region_conv_impl`)."""


def _runs_anywhere(device_type: str) -> bool:
    return True


def register_region_conv_impl(name: str, runs_on: Callable[[str], bool] = _runs_anywhere):
    """Class decorator: register a ``torch.autograd.Function`` as implementation ``name`` of region_conv2d.

    Its ``apply`` takes ``(x, guide, filters, stride, padding, dilation)`` with pairs for the last three.
    ``runs_on(device_type)`` says whether it can run here on tensors of that device type ("cpu", "cuda"), for an
    implementation that cannot run everywhere (a GPU kernel).
    """

    def decorator(function: Type[torch.autograd.Function]) -> Type[torch.autograd.Function]:
        _registered[name] = RegionConvImpl(function, runs_on)
        return function

    return decorator


def conv_output_size(size: IntPair, kernel_size: IntPair, stride: IntPair, padding: IntPair, dilation: IntPair):
    """Spatial output size (H', W') of a convolution, as ``nn.Conv2d`` computes it."""
    return tuple(
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(_pair(size), _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation))
    )


def detached_unless_recorded(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors, detached where autograd will not record the call (``torch.no_grad``), so that an
    implementation's ``ctx.needs_input_grad`` says whether a backward can come and its forward keeps nothing for
    one that cannot (inside ``Function.forward`` grad mode is always off, and ``needs_input_grad`` only reads
    ``requires_grad``).

    >>> with torch.no_grad():
    ...     detached_unless_recorded(torch.ones(1, requires_grad=True), None)[0].requires_grad
    False
    """
    if torch.is_grad_enabled():
        return list(tensors)
    return [None if t is None else t.detach() for t in tensors]


def per_sample_conv2d(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int = 1):
    """Convolve each sample with its own weight: x (B, C, H, W), weight (B, O, C/groups, kh, kw) -> (B, O, H', W').

    The batch is folded into the channel groups, so it is one ``F.conv2d`` call.
    """
    batch, channels, height, width = x.shape
    out_channels = weight.shape[1]
    out = F.conv2d(
        x.reshape(1, batch * channels, height, width),
        weight.reshape(batch * out_channels, *weight.shape[2:]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=batch * groups,
    )
    return out.view(batch, out_channels, *out.shape[-2:])


def guide_gradient(guide: torch.Tensor, region_scores: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 6-8: ``s * (g - <s, g>)`` with ``s = softmax(guide)`` over regions (dim 1).

    ``region_scores`` is g of Eq. 7, (B, m, H', W'): for each region j, ``<dL/dW_hat, W_j>`` at each position.
    """
    soft = torch.softmax(guide, dim=1)
    return soft * (region_scores - (soft * region_scores).sum(dim=1, keepdim=True))
