"""Functional form of DRConv's core: :func:`region_conv2d`, with interchangeable implementations.

Each output position (b, u, v) is computed with the filter of region ``argmax_t guide[b, t, u, v]`` (the paper's
Eq. 3-5). Because argmax has no gradient, the guide receives the paper's approximate gradient (Eq. 6-8): with
``s = softmax(guide)`` over regions and ``g_j = <dL/dW_hat, W_j>`` (the sum over output channels of
``grad_y`` times the output that filter j would give at that position), ``dL/dguide = s * (g - sum_j s_j g_j)``.
``x`` and ``filters`` receive exact gradients: at each position only the selected region's filter gets one.

Implementations are registered by name so that a faster one can sit beside the reference and be tested
against it; suites record which one ran.

>>> import torch
>>> x = torch.randn(2, 8, 10, 10)
>>> guide = torch.randn(2, 4, 10, 10)                 # m = 4 regions, at the output resolution
>>> filters = torch.randn(2, 4, 16, 8, 3, 3)          # (B, m, O, C, kh, kw)
>>> region_conv2d(x, guide, filters, padding=1).shape
torch.Size([2, 16, 10, 10])
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Type

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

IntPair = int | tuple[int, int]


class _Implementation(NamedTuple):
    function: Type[torch.autograd.Function]
    runs_on: Callable[[str], bool]  # whether it can run here on tensors of a device type


_IMPLEMENTATIONS: dict[str, _Implementation] = {}
# Preferred implementations per device type, fastest first (measured: benchmarks/test_region_conv_bench.py); the
# reference stays selectable by name (impl="reference").
_PREFERRED_IMPLS = {"cuda": ("triton", "fast"), "cpu": ("compiled", "fast")}
_PREFERRED_ELSEWHERE = ("fast",)


def _runs_anywhere(device_type: str) -> bool:
    return True


def register_region_conv_impl(name: str, runs_on: Callable[[str], bool] = _runs_anywhere):
    """Class decorator: register a ``torch.autograd.Function`` as implementation ``name`` of region_conv2d.

    Its ``apply`` takes ``(x, guide, filters, stride, padding, dilation)`` with pairs for the last three.
    ``runs_on(device_type)`` says whether it can run here on tensors of that device type ("cpu", "cuda"), for an
    implementation that cannot run everywhere (a GPU kernel).
    """

    def decorator(function: Type[torch.autograd.Function]) -> Type[torch.autograd.Function]:
        _IMPLEMENTATIONS[name] = _Implementation(function, runs_on)
        return function

    return decorator


def region_conv_impls(device_type: str | None = None) -> list[str]:
    """Names of the registered implementations; given a ``device_type`` ("cpu", "cuda"), only those that can run
    here on tensors of that type (tests and benchmarks iterate over these)."""
    return [name for name, found in _IMPLEMENTATIONS.items() if device_type is None or found.runs_on(device_type)]


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
    return [f"prim::PythonOp.{found.function.__name__}" for found in _IMPLEMENTATIONS.values()]


def conv_output_size(size: IntPair, kernel_size: IntPair, stride: IntPair, padding: IntPair, dilation: IntPair):
    """Spatial output size (H', W') of a convolution, as ``nn.Conv2d`` computes it."""
    return tuple(
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(_pair(size), _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation))
    )


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
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown region_conv2d implementation {name!r}; expected one of: {region_conv_impls()}")
    return _IMPLEMENTATIONS[name].function.apply(x, guide, filters, _pair(stride), _pair(padding), _pair(dilation))


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


@register_region_conv_impl("reference")
class RegionConv2dReference(torch.autograd.Function):
    """Straightforward implementation: every region's output everywhere, then one kept per position.

    It costs m convolutions and holds m outputs; it is the reference that faster implementations are tested
    against, not the one to time.
    """

    @staticmethod
    def forward(ctx, x, guide, filters, stride, padding, dilation):
        region_outputs = _all_region_outputs(x, filters, stride, padding, dilation)  # (B, m, O, H', W')
        mask = guide.argmax(dim=1)
        ctx.save_for_backward(x, guide, filters, mask)
        ctx.conv_args = (stride, padding, dilation)
        return _select_regions(region_outputs, mask)

    @staticmethod
    def backward(ctx, grad_out):
        x, guide, filters, mask = ctx.saved_tensors
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(ctx.needs_input_grad[0])
            filters_ = filters.detach().requires_grad_(ctx.needs_input_grad[2])
            region_outputs = _all_region_outputs(x_, filters_, *ctx.conv_args)
            selected = _select_regions(region_outputs, mask)
            wanted = [t for t, need in ((x_, ctx.needs_input_grad[0]), (filters_, ctx.needs_input_grad[2])) if need]
            grads = iter(torch.autograd.grad(selected, wanted, grad_out) if wanted else ())
        grad_x = next(grads) if ctx.needs_input_grad[0] else None
        grad_filters = next(grads) if ctx.needs_input_grad[2] else None
        grad_guide = None
        if ctx.needs_input_grad[1]:
            region_scores = torch.einsum("bmohw,bohw->bmhw", region_outputs.detach(), grad_out)
            grad_guide = guide_gradient(guide, region_scores)
        return grad_x, grad_guide, grad_filters, None, None, None


def _all_region_outputs(x, filters, stride, padding, dilation):
    batch, regions, out_channels = filters.shape[:3]
    stacked = filters.reshape(batch, regions * out_channels, *filters.shape[3:])
    out = per_sample_conv2d(x, stacked, stride, padding, dilation)
    return out.view(batch, regions, out_channels, *out.shape[-2:])


def _select_regions(region_outputs, mask):
    index = mask[:, None, None].expand(-1, 1, region_outputs.shape[2], -1, -1)
    return region_outputs.gather(1, index).squeeze(1)


# Register the "fast" and (where triton is installed) "triton" implementations; at the bottom because they build on
# the helpers above.
from drbench.ops import region_conv_fast, region_conv_triton, region_conv_cpu  # noqa: E402,F401
