"""Functional form of DRConv's core: :func:`region_conv2d`, with interchangeable implementations.

Each output position (b, u, v) is computed with the filter of region ``argmax_t guide[b, t, u, v]`` (the paper's
Eq. 3-5). Because argmax has no gradient, the guide receives the paper's approximate gradient (Eq. 6-8): with
``s = softmax(guide)`` over regions and ``g_j = <dL/dW_hat, W_j>`` (the sum over output channels of
``grad_y`` times the output that filter j would give at that position), ``dL/dguide = s * (g - sum_j s_j g_j)``.
``x`` and ``filters`` receive exact gradients: at each position only the selected region's filter gets one.

Implementations are registered by name so that a faster one can sit beside the reference and be tested
against it; suites record which one ran. Each lives in its own module and joins the registry of
:mod:`drbench.ops.region_conv_base` on import; this module imports them all, so that the questions below
(:func:`region_conv_impls`, :func:`default_region_conv_impl`, :func:`region_conv_op_names`) see every one.

>>> import torch
>>> x = torch.randn(2, 8, 10, 10)
>>> guide = torch.randn(2, 4, 10, 10)                 # m = 4 regions, at the output resolution
>>> filters = torch.randn(2, 4, 16, 8, 3, 3)          # (B, m, O, C, kh, kw)
>>> region_conv2d(x, guide, filters, padding=1).shape
torch.Size([2, 16, 10, 10])
"""

from __future__ import annotations

import torch
from torch.nn.modules.utils import _pair

from drbench.ops.region_conv_base import REGISTERED, IntPair, conv_output_size, detached_unless_recorded

# Importing an implementation registers it, so this order is the listing order of region_conv_impls(): the reference
# first. "triton" registers only where triton is installed.
import drbench.ops.region_conv_reference  # noqa: F401
import drbench.ops.region_conv_fast  # noqa: F401
import drbench.ops.region_conv_triton  # noqa: F401
import drbench.ops.region_conv_cpu  # noqa: F401

# Preferred implementations per device type, fastest first (measured: benchmarks/test_region_conv_bench.py); the
# reference stays selectable by name (impl="reference").
_PREFERRED_IMPLS = {"cuda": ("triton", "fast"), "cpu": ("compiled", "fast")}
_PREFERRED_ELSEWHERE = ("fast",)


def region_conv_impls(device_type: str | None = None) -> list[str]:
    """Names of the registered implementations; given a ``device_type`` ("cpu", "cuda"), only those that can run
    here on tensors of that type (tests and benchmarks iterate over these)."""
    return [name for name, found in REGISTERED.items() if device_type is None or found.runs_on(device_type)]


def default_region_conv_impl(device_type: str) -> str:
    """The implementation :func:`region_conv2d` runs on tensors of ``device_type`` when none is named: the fastest
    correct one registered there. On CUDA that is the Triton kernel where triton is installed, on CPU the compiled
    kernels where they build; else "fast".

    >>> default_region_conv_impl("meta")
    'fast'
    """
    preferred = _PREFERRED_IMPLS.get(device_type, _PREFERRED_ELSEWHERE)
    return next(name for name in preferred if name in region_conv_impls(device_type))


def region_conv_op_names() -> list[str]:
    """The names under which tracers (fvcore, torch.jit) see each implementation, e.g. for op handles."""
    return [f"prim::PythonOp.{found.function.__name__}" for found in REGISTERED.values()]


def check_region_conv_args(x: torch.Tensor, guide: torch.Tensor, filters: torch.Tensor, stride, padding, dilation):
    """Validate shapes; raise ``ValueError`` saying what was expected."""
    if x.dim() != 4:
        raise ValueError(f"region_conv2d: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if filters.dim() != 6:
        raise ValueError(f"region_conv2d: filters must be (B, m, O, C, kh, kw), got shape {tuple(filters.shape)}")
    if guide.dim() != 4:
        raise ValueError(f"region_conv2d: guide must be (B, m, H', W'), got shape {tuple(guide.shape)}")
    batch, channels = x.shape[:2]
    f_batch, regions, _, f_channels, kh, kw = filters.shape
    if f_batch != batch or f_channels != channels:
        raise ValueError(
            f"region_conv2d: filters {tuple(filters.shape)} must be (B={batch}, m, O, C={channels}, kh, kw) "
            f"for x of shape {tuple(x.shape)}"
        )
    out_size = conv_output_size(x.shape[-2:], (kh, kw), stride, padding, dilation)
    if min(out_size) < 1:
        raise ValueError(f"region_conv2d: the {kh}x{kw} kernel does not fit the input {tuple(x.shape[-2:])}")
    expected_guide = (batch, regions, *out_size)
    if tuple(guide.shape) != expected_guide:
        raise ValueError(
            f"region_conv2d: guide must be (B, m, H', W') = {expected_guide} (the output resolution), "
            f"got {tuple(guide.shape)}"
        )
    if not (x.dtype == guide.dtype == filters.dtype):
        raise TypeError(
            f"region_conv2d: x, guide and filters must share a dtype, got {x.dtype}, {guide.dtype}, {filters.dtype}"
        )


def region_conv2d(
    x: torch.Tensor,
    guide: torch.Tensor,
    filters: torch.Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    impl: str | None = None,
) -> torch.Tensor:
    """Region-aware convolution: (B, C, H, W) x guide (B, m, H', W') x filters (B, m, O, C, kh, kw) -> (B, O, H', W').

    ``impl`` picks a registered implementation (:func:`region_conv_impls`); ``None`` takes the device's default
    (:func:`default_region_conv_impl`).
    """
    check_region_conv_args(x, guide, filters, stride, padding, dilation)
    x, guide, filters = detached_unless_recorded(x, guide, filters)
    name = impl or default_region_conv_impl(x.device.type)
    if name not in REGISTERED:
        raise ValueError(f"unknown region_conv2d implementation {name!r}; expected one of: {region_conv_impls()}")
    return REGISTERED[name].function.apply(x, guide, filters, _pair(stride), _pair(padding), _pair(dilation))
