"""Compiled CPU region convolution: positions sorted by (region, sample), one GEMM per region or segment, no padding.

Two ways to compute a DRConv layer share these kernels (``csrc/region_conv_cpu.cpp``, built with torch's C++
extension loader on first use and kept between runs):

- **Per-sample filters** (implementation ``"compiled"`` of :func:`~drbench.ops.functional.region_conv2d`): any
  filters (B, m, O, C, kh, kw). A segment is a (sample, region) pair; its positions' patches are gathered into
  columns and multiplied by that filter.
- **Factored filters** (:func:`factored_region_conv2d`, what :class:`~drbench.ops.drconv.DRConv2d` runs for its
  ``dynamic`` and ``static`` generators): ``filter[b, t, :, :, tap] = sum_q coeffs[b, t, q, tap] * W_q[t]`` with
  weights ``W_q`` (m, O, C) shared by the batch, and no (B, m, O, C, kh, kw) tensor. Either a position in region t
  is ``sum_q W_q[t] @ (sum_tap coeffs[b, t, q, tap] * x_tap)``, one GEMM per region over every sample's positions
  (stencils), or each segment's filter is made from the factors where its product runs (filters), whichever
  :func:`stencils_are_cheaper` says. Without coefficients (the static generator) the columns are patches and the
  weight is the region's filter.

Without autograd the forward goes a block of output rows at a time, in cache. With it, the features are kept, and
the backward gives exact gradients of x, the coefficients and the weights through the same columns, and the guide's
from Eq. 6-8, whose region scores need every region's response everywhere: from the factors (a GEMM of grad_out
against every region's stacked weights, then stencils) or from materialised filters (fast's batched products),
whichever :func:`factored_scores_are_cheaper` says.

A pointwise layer without autograd goes further (:func:`pointwise_forward`): its guide convolution is scored in the
same kernel, block by block. The kernels' matrix products call OpenBLAS where the ``scipy-openblas32`` package is
installed (:func:`blas` says which BLAS they use), torch's BLAS otherwise.

Where the extension cannot be built (no compiler, no headers), :func:`extension` warns once and returns None;
callers then use the pure-torch implementations. ``DRBENCH_NO_COMPILE=1`` forces that.

>>> import torch
>>> from drbench.ops.functional import region_conv2d
>>> x, guide, filters = torch.randn(2, 8, 10, 10), torch.randn(2, 4, 10, 10), torch.randn(2, 4, 16, 8, 3, 3)
>>> expected = region_conv2d(x, guide, filters, padding=1, impl="reference")
>>> not available() or torch.allclose(region_conv2d(x, guide, filters, padding=1, impl="compiled"), expected,
...                                   atol=1e-4)
True
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import NamedTuple, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.profiler import record_function
from torch.utils import cpp_extension
from torch.utils.flop_counter import register_flop_formula

from drbench.ops.region_conv_base import detached_unless_recorded, guide_gradient, register_region_conv_impl
from drbench.ops.region_conv_fast import _Geometry, _region_scores

_SOURCE = Path(__file__).with_name("csrc") / "region_conv_cpu.cpp"
# Features and results of one block of output rows in a forward that keeps nothing for backward: 1 MB in float32,
# about a core's L2 cache here. Measured on the layer shapes of the benchmarks: 256 KB blocks were up to 1.5x slower
# (each block sorts, gathers and calls the GEMMs again), 4 MB blocks no faster.
_BLOCK_ELEMENTS = 1 << 18


@torch.library.custom_op("drbench::executed_macs", mutates_args=())
def executed_macs(anchor: torch.Tensor, macs: int) -> None:
    """Does nothing: it exists so that ``torch.utils.flop_counter.FlopCounterMode``, which sees only dispatcher
    operators, can count the multiply-adds of the compiled kernels (``macs``, reported by their callers while a
    dispatch mode is active; ``anchor`` gives the call a device)."""


@register_flop_formula(torch.ops.drbench.executed_macs)
def _executed_macs_flops(anchor_shape, macs: int, *args, **kwargs) -> int:
    return 2 * macs


def counting_dispatch() -> bool:
    """Whether a dispatch mode (FlopCounterMode, drbench's memory meter) is watching: only then do the kernels'
    callers compute and report their multiply-adds with :func:`executed_macs`, off the hot path otherwise."""
    return torch._C._len_torch_dispatch_stack() > 0


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernels; None, with one warning, where they cannot be built, or when ``DRBENCH_NO_COMPILE`` is
    set.

    The first call on a machine builds them (tens of seconds, with torch's C++ extension loader) into a folder
    named after the source, the flags and torch's version, under ``TORCH_EXTENSIONS_DIR`` (default
    ``~/.cache/torch_extensions``); later processes import the built module straight from there. That skips the
    loader's lock and up-to-date check, which cost every process (each worker of a suite) a second, and which a
    process killed while holding the lock would block forever.
    """
    if os.environ.get("DRBENCH_NO_COMPILE"):
        return None
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT": the build targets it
    arch = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}.get(capability, [])
    flags = ["-O3", "-fopenmp", *arch]
    ldflags = ["-fopenmp"]
    openblas = _openblas()
    if openblas is not None:
        flags.append("-DDRBENCH_OPENBLAS")
        ldflags += [f"-L{openblas.get_lib_dir()}", f"-l{openblas.get_library()}", f"-Wl,-rpath,{openblas.get_lib_dir()}"]
    stamp = hashlib.sha256("\0".join([_SOURCE.read_text(), *flags, *ldflags, torch.__version__]).encode()).hexdigest()[:16]
    name = f"drbench_region_conv_cpu_{capability.lower()}_{stamp}"
    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
    built = folder / f"{name}.so"
    try:
        if built.exists():
            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        folder.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=flags,
                                  extra_ldflags=ldflags, build_directory=str(folder), verbose=False)
    except Exception as error:  # noqa: BLE001 - no compiler, no headers, a failed build: all mean "not here"
        lines = str(error).strip().splitlines()
        warnings.warn(f"drbench: the compiled region convolution could not be built ({type(error).__name__}: "
                      f"{lines[-1] if lines else ''}); using the pure-torch implementations, which are slower",
                      RuntimeWarning, stacklevel=2)
        return None


def _openblas() -> ModuleType | None:
    """The scipy-openblas32 package (OpenBLAS with prefixed symbols, so it cannot clash with torch's MKL), whose
    GEMMs the kernels call, one thread each; None where it is not installed (the kernels then use torch's BLAS)."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    return scipy_openblas32


def blas() -> str | None:
    """Which BLAS the compiled kernels' products call (a result record's ``env.drconv_blas``); None without the
    kernels."""
    ext = extension()
    return None if ext is None else ext.blas()


def available() -> bool:
    """Whether the compiled kernels run here (building them on first call)."""
    return extension() is not None


def _runs_on(device_type: str) -> bool:
    return device_type == "cpu" and available()


def conv_args(kernel: Sequence[int], stride, padding, dilation) -> list[int]:
    """The kernels' geometry argument: kh, kw, stride, padding, dilation as eight ints."""
    return [*kernel, *stride, *padding, *dilation]


class Routing(NamedTuple):
    """What a forward keeps for backward: each position's region (B*P), the positions in (region, sample) order
    (N), the segments' first columns (m * B + 1) and the feature columns (K, N)."""

    mask: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    features: torch.Tensor


def bucketed_forward(x, guide, coeffs, weights, kernel, stride, padding, dilation, *, per_sample: bool = False,
                     stencils: bool = True, bias=None, keep: bool = False):
    """The layer's output (B, O, H', W') (plus ``bias`` per channel when given), and when ``keep`` the routing and
    features that :func:`bucketed_backward` needs. Without ``keep`` the compiled ``blocked_forward`` does a block of
    output rows at a time, in cache; with it, the whole batch's features are made once and kept.

    Three ways, by the arguments:

    - ``coeffs`` (B, m, Q, taps) and ``stencils``: coefficient-stencil features, GEMMs per region on the shared
      ``weights`` (Q tensors (m, O, C));
    - ``coeffs`` and not ``stencils``: patch features, each segment's filter made from the factors by the thread
      that multiplies by it;
    - no ``coeffs``: patch features and ``weights`` holding whole filters, (m, O, C * taps) shared, or
      (m, B, O, C * taps) when ``per_sample``.
    """
    ext = extension()
    conv = conv_args(kernel, stride, padding, dilation)
    regions, positions = guide.shape[1], guide.shape[-2] * guide.shape[-1]
    if counting_dispatch():
        executed_macs(x, _executed_macs(x, regions, positions, coeffs, weights, kernel, stencils))
    if not keep:
        out, _ = ext.blocked_forward(x, guide, None, None, coeffs, weights, per_sample, stencils, conv, bias,
                                     _BLOCK_ELEMENTS)
        return out, None
    out = x.new_empty(x.shape[0], weights[0].shape[-2], *guide.shape[-2:])
    mask, order, offsets = ext.route(guide)
    features = ext.gather_features(x, mask, order, offsets, coeffs if stencils else None, conv, *guide.shape[-2:])
    if coeffs is not None and not stencils:
        columns = ext.factored_filter_matmul(features, offsets, coeffs, weights)
    else:
        columns = ext.bucket_matmul(features, offsets, weights, regions, per_sample)
    ext.scatter_columns(columns, order, offsets, out, bias)
    return out, Routing(mask, order, offsets, features)


def _executed_macs(x, regions: int, positions: int, coeffs, weights, kernel, stencils: bool) -> int:
    """Multiply-adds the compiled forward runs: its GEMMs (Q * C or C * taps per output channel and position) and,
    when it makes filters from factors, those (m per sample, Q * O * C * taps each)."""
    batch, channels = x.shape[:2]
    taps = kernel[0] * kernel[1]
    out_channels = weights[0].shape[-2]
    rows = len(weights) * channels if coeffs is not None and stencils else channels * taps
    made = regions * len(weights) * out_channels * channels * taps if coeffs is not None and not stencils else 0
    return batch * (positions * out_channels * rows + made)


def pointwise_forward(x: torch.Tensor, guide_weight: torch.Tensor, guide_bias: torch.Tensor | None,
                      coeffs: torch.Tensor | None, weights: Sequence[torch.Tensor],
                      bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A pointwise DRConv layer (1x1, stride 1, no padding) that nothing will differentiate, guide convolution
    included: the output and the region of each position (B, H, W).

    The guide convolution (``guide_weight`` (m, C, 1, 1), ``guide_bias``) is computed block by block as the
    positions are routed, from input columns already in cache, where the guided feature would be a pass through the
    input and a tensor (at batch 1 the separate product cost as much as the rest of a small layer). Factors as
    :func:`factored_region_conv2d`'s.

    >>> import torch
    >>> x, guide_weight = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 1, 1)
    >>> coeffs, weights = torch.rand(2, 4, 2, 1), [torch.randn(4, 16, 8), torch.randn(4, 16, 8)]
    >>> guide = torch.nn.functional.conv2d(x, guide_weight)
    >>> out, regions = pointwise_forward(x, guide_weight, None, coeffs, weights)
    >>> torch.equal(regions, guide.argmax(1)) and torch.allclose(
    ...     out, factored_region_conv2d(x, guide, coeffs, weights, (1, 1)), atol=1e-5)
    True
    """
    regions, positions = guide_weight.shape[0], x.shape[-2] * x.shape[-1]
    stencils = _uses_stencils(x, regions, positions, coeffs, weights, (1, 1), training=False)
    if counting_dispatch():
        guide_macs = x.shape[0] * positions * regions * x.shape[1]
        executed_macs(x, guide_macs + _executed_macs(x, regions, positions, coeffs, weights, (1, 1), stencils))
    return extension().blocked_forward(x, None, guide_weight.flatten(1), guide_bias, coeffs, weights, False,
                                       stencils, conv_args((1, 1), (1, 1), (0, 0), (1, 1)), bias, _BLOCK_ELEMENTS)


def bucketed_backward(grad_out, x, coeffs, weights, per_sample: bool, routing: Routing, kernel, stride, padding,
                      dilation, need_x: bool, need_coeffs: bool, need_weights: bool):
    """Gradients of x, the coefficients and the weights (each None unless asked for) through the segments, for a
    forward with stencils (``coeffs``) or whole filters (``coeffs`` None)."""
    ext = extension()
    conv = conv_args(kernel, stride, padding, dilation)
    out_h, out_w = grad_out.shape[-2:]
    regions = (len(routing.offsets) - 1) // x.shape[0]
    with record_function("drconv.backward.gemms"):
        grad_columns = ext.gather_columns(grad_out, routing.order, routing.offsets)
        grad_features, *grad_weights = ext.bucket_matmul_backward(
            grad_columns, routing.features, routing.offsets, weights, regions, per_sample, need_x or need_coeffs,
            need_weights)
    grad_x = grad_coeffs = None
    if need_x:
        with record_function("drconv.backward.input"):
            grad_x = ext.features_backward_input(grad_features, x, *routing[:3], coeffs, conv, out_h, out_w)
    if need_coeffs:
        with record_function("drconv.backward.coefficients"):
            grad_coeffs = ext.features_backward_coeffs(grad_features, x, *routing[:3], coeffs.shape[2], conv, out_h,
                                                       out_w)
    return grad_x, grad_coeffs, (grad_weights if need_weights else None)


def _per_segment(filters: torch.Tensor) -> torch.Tensor:
    """Filters (B, m, O, C, kh, kw) as the per-sample GEMMs read them, (m, B, O, C * kh * kw): a view of filters
    that a generator made region-major (the dynamic one does)."""
    return filters.transpose(0, 1).flatten(3)


@register_region_conv_impl("compiled", runs_on=_runs_on)
class RegionConv2dCompiled(torch.autograd.Function):
    """Any per-sample filters through the compiled kernels: a bucket per (sample, region), the multiply-adds of a
    convolution (no tile padding), gradients as the fast implementation defines them."""

    @staticmethod
    def forward(ctx, x, guide, filters, stride, padding, dilation):
        kernel = tuple(filters.shape[-2:])
        out, routing = bucketed_forward(x, guide, None, [_per_segment(filters)], kernel, stride, padding, dilation,
                                        per_sample=True, keep=any(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(x, guide, filters)
        ctx.routing, ctx.conv = routing, (kernel, stride, padding, dilation)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, guide, filters = ctx.saved_tensors
        need_x, need_guide, need_filters = ctx.needs_input_grad[:3]
        grad_x, _, grad_weights = bucketed_backward(grad_out, x, None, [_per_segment(filters)], True, ctx.routing,
                                                       *ctx.conv, need_x, False, need_filters)
        grad_filters = grad_weights[0].view(filters.transpose(0, 1).shape).transpose(0, 1) if need_filters else None
        grad_guide = None
        if need_guide:
            geometry = _Geometry.of(x, guide, filters, *ctx.conv[1:])
            scores = _region_scores(geometry, x, filters.contiguous(), grad_out.contiguous().flatten(2))
            grad_guide = guide_gradient(guide, scores.view_as(guide))
        return grad_x, grad_guide, grad_filters, None, None, None


def factored_region_conv2d(x: torch.Tensor, guide: torch.Tensor, coeffs: torch.Tensor | None,
                           weights: Sequence[torch.Tensor], kernel_size: tuple[int, int], stride=(1, 1),
                           padding=(0, 0), dilation=(1, 1), bias: torch.Tensor | None = None) -> torch.Tensor:
    """Region convolution with factored filters, ``filter[b, t, :, :, tap] = sum_q coeffs[b, t, q, tap] * weights[q][t]``
    (coeffs (B, m, Q, kh*kw), weights Q tensors (m, O, C)), or, with ``coeffs`` None, the batch-shared filters
    ``weights[0]`` (m, O, C * kh * kw); ``bias`` (O,) is added. Differentiable in every tensor argument.

    >>> import torch
    >>> x, guide = torch.randn(2, 8, 10, 10), torch.randn(2, 4, 10, 10)
    >>> coeffs, weights = torch.rand(2, 4, 2, 9), [torch.randn(4, 16, 8), torch.randn(4, 16, 8)]
    >>> filters = torch.einsum("bjqt,qjoc->bjoct", coeffs, torch.stack(weights)).reshape(2, 4, 16, 8, 3, 3)
    >>> from drbench.ops.functional import region_conv2d
    >>> expected = region_conv2d(x, guide, filters, padding=1, impl="reference")
    >>> not available() or torch.allclose(
    ...     factored_region_conv2d(x, guide, coeffs, weights, (3, 3), padding=(1, 1)), expected, atol=1e-4)
    True
    """
    conv = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    tensors = (x, guide, coeffs, bias, *weights)
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if recorded or torch.jit.is_tracing():  # a tracer (fvcore's MAC count) sees the Function, not the kernels
        x, guide, coeffs, bias, *weights = detached_unless_recorded(*tensors)
        return FactoredRegionConv2d.apply(x, guide, coeffs, bias, conv, *weights)
    # nothing to differentiate: straight to the kernels (autograd's machinery costs microseconds a layer at batch 1)
    stencils = _uses_stencils(x, guide.shape[1], guide.shape[-2] * guide.shape[-1], coeffs, weights, conv[0],
                              training=False)
    return bucketed_forward(x, guide, coeffs, weights, *conv, stencils=stencils, bias=bias)[0]


def stencils_are_cheaper(terms: int, out_channels: int, channels: int, taps: int, regions: int, positions: int,
                         batch: int, training: bool = False) -> bool:
    """Whether a factored layer's forward costs less with stencil features (GEMMs on the shared weights) than with
    patches and each segment's filter made from the factors.

    Stencils cost Q * (O + taps) * C multiply-adds per position. Filters cost a convolution's O * C * taps per
    position, plus making m filters per sample (m * Q * O * C * taps); in ``training``, or when a filter is larger
    than :data:`FILTER_IN_CACHE` floats, they also go out to memory and back (2 * O * C * taps floats, at
    :data:`FLOAT_COST` multiply-adds each: the backward makes them all again), where without autograd a smaller one
    is still in the core's cache when its product reads it. Both read the weights once. A k x k kernel favours stencils (Q = 2 against taps = 9 at the paper's hidden
    width), a 1x1 kernel filters, except for wide layers on small maps at batch 1 (measured: 232 -> 232 at 7x7,
    filters 26% faster; 464 -> 464, stencils 21% faster).

    >>> stencils_are_cheaper(2, 64, 64, 9, 8, 784, 16), stencils_are_cheaper(2, 116, 116, 1, 8, 784, 32)
    (True, False)
    >>> stencils_are_cheaper(2, 232, 232, 1, 8, 49, 1), stencils_are_cheaper(2, 464, 464, 1, 8, 49, 1)
    (False, True)
    >>> stencils_are_cheaper(2, 48, 48, 1, 8, 64, 32), stencils_are_cheaper(2, 48, 48, 1, 8, 64, 32, training=True)
    (False, True)
    """
    with_stencils = batch * positions * terms * channels * (out_channels + taps)
    filter_size = out_channels * channels * taps
    traffic = 2 * FLOAT_COST if training or filter_size > FILTER_IN_CACHE else 0
    with_filters = batch * (positions * filter_size + regions * filter_size * (terms + traffic))
    return with_stencils < with_filters


FILTER_IN_CACHE = 180_000
"""Floats (0.7 MB) up to which a generated filter is still in a core's L2 cache (1 MB here, shared with the block's
features and results) when the product that made it for reads it."""

FLOAT_COST = 8
"""Multiply-adds that moving one float to or from memory costs, for choosing between ways of computing: this
machine's one core reads about 9 G floats/s (37 GB/s, a 64 MB sum) and multiplies-adds about 75 G/s in a GEMM."""

def factored_scores_are_cheaper(regions: int, terms: int, out_channels: int, channels: int, taps: int,
                                positions: int) -> bool:
    """Whether Eq. 7's region scores cost less from the factors than from materialised filters.

    Per position, from the factors: every region's back-projection (m * Q * O * C, one GEMM over many samples) and
    its stencils (m * Q * taps * C); from filters: every region's response (m * O * C * taps), plus making the filters
    (m * Q * O * C * taps per sample, spread over its positions), in one product per sample, whose P columns run at
    about P / (P + :data:`NARROW_COLUMNS`) of full speed. k x k kernels favour the factors; 1x1 kernels the filters,
    except on the small maps of 32px training (4x4: 2.2x faster from the factors, 8x8: even; measured).

    >>> factored_scores_are_cheaper(8, 2, 64, 64, 9, 784), factored_scores_are_cheaper(8, 2, 116, 116, 1, 784)
    (True, False)
    >>> factored_scores_are_cheaper(8, 2, 96, 96, 1, 16)
    True
    """
    from_factors = regions * terms * channels * (out_channels + taps)
    from_filters = regions * out_channels * channels * taps * (1 + terms / positions) * (1 + NARROW_COLUMNS / positions)
    return from_factors < from_filters


NARROW_COLUMNS = 64
"""Columns at which a matrix product per sample runs at about half its full speed here (small maps in training)."""


class FactoredRegionConv2d(torch.autograd.Function):
    """:func:`factored_region_conv2d`: stencils and GEMMs per region on the shared weights, or patches and filters
    made per segment, whichever costs less (:func:`stencils_are_cheaper`)."""

    @staticmethod
    def forward(ctx, x, guide, coeffs, bias, conv, *weights):
        keep = any(ctx.needs_input_grad)
        stencils = _uses_stencils(x, guide.shape[1], guide.shape[-2] * guide.shape[-1], coeffs, weights, conv[0],
                                  training=keep)
        out, routing = bucketed_forward(x, guide, coeffs, weights, *conv, stencils=stencils, bias=bias, keep=keep)
        ctx.save_for_backward(x, guide, coeffs, *weights)
        ctx.routing, ctx.conv, ctx.stencils = routing, conv, stencils
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, guide, coeffs, *weights = ctx.saved_tensors
        need_x, need_guide, need_coeffs, need_bias = ctx.needs_input_grad[:4]
        need_weights = any(ctx.needs_input_grad[5:])
        grad_out = grad_out.contiguous()
        filters = None if ctx.stencils else _filters_from_factors(coeffs, weights, ctx.conv[0])
        if filters is None:
            grad_x, grad_coeffs, grad_weights = bucketed_backward(
                grad_out, x, coeffs, weights, False, ctx.routing, *ctx.conv, need_x, need_coeffs, need_weights)
        else:  # through the filters the forward made per segment, then back to their factors
            grad_x, _, grad_filters = bucketed_backward(grad_out, x, None, [_per_segment(filters)], True,
                                                        ctx.routing, *ctx.conv, need_x, False,
                                                        need_coeffs or need_weights)
            grad_coeffs, grad_weights = _factor_gradients(coeffs, weights, grad_filters, need_coeffs, need_weights)
        grad_guide = None
        if need_guide:
            with record_function("drconv.backward.guide"):
                grad_guide = _factored_guide_gradient(grad_out, x, guide, coeffs, weights, filters, ctx.conv)
        grad_bias = grad_out.sum(dim=(0, 2, 3)) if need_bias else None
        return (grad_x, grad_guide, grad_coeffs, grad_bias, None,
                *(grad_weights if need_weights else [None] * len(weights)))


def _uses_stencils(x, regions: int, positions: int, coeffs, weights, kernel, training: bool) -> bool:
    """The way :func:`stencils_are_cheaper` chooses for this call (always stencils without coefficients)."""
    if coeffs is None:
        return True
    return stencils_are_cheaper(len(weights), weights[0].shape[1], x.shape[1], kernel[0] * kernel[1], regions,
                                positions, x.shape[0], training)


def _filters_from_factors(coeffs, weights, kernel) -> torch.Tensor:
    """The (B, m, O, C, kh, kw) filters that factors describe, region-major in memory (a view of (m, B, ...)):
    per region, (B, Q) coefficients times (Q, O * C) weights for each tap, one batched product."""
    batch, regions, terms, taps = coeffs.shape
    out_channels, channels = weights[0].shape[1:]
    stacked = torch.stack(weights, dim=1).view(regions, terms, -1)  # (m, Q, O * C)
    by_tap = coeffs.permute(1, 3, 0, 2).reshape(regions, taps * batch, terms)  # (m, taps * B, Q)
    filters = torch.bmm(by_tap, stacked).view(regions, taps, batch, out_channels, channels)
    return filters.permute(0, 2, 3, 4, 1).reshape(regions, batch, out_channels, channels, *kernel).transpose(0, 1)


def _factor_gradients(coeffs, weights, grad_filters, need_coeffs: bool, need_weights: bool):
    """The gradients of the factors from those of the filters they make (m, B, O, C * taps): per (b, t, tap),
    <dF, W_q>; per (t, q), the sum over samples and taps of coeffs times dF. Batched products per region."""
    if not (need_coeffs or need_weights):
        return None, None
    batch, regions, terms, taps = coeffs.shape
    grad = grad_filters[0].reshape(regions, batch, -1, taps).transpose(2, 3).reshape(regions, batch * taps, -1)
    stacked = torch.stack(weights, dim=1).view(regions, terms, -1)  # (m, Q, O * C)
    by_tap = coeffs.permute(1, 0, 3, 2).reshape(regions, batch * taps, terms)  # (m, B * taps, Q)
    grad_coeffs = grad_weights = None
    if need_coeffs:
        grad_coeffs = torch.bmm(grad, stacked.transpose(1, 2)).view(regions, batch, taps, terms).permute(1, 0, 3, 2)
    if need_weights:
        grad_weights = list(torch.bmm(by_tap.transpose(1, 2), grad).view_as(stacked).unbind(1))
        grad_weights = [w.view_as(weights[0]) for w in grad_weights]
    return grad_coeffs, grad_weights


def _factored_guide_gradient(grad_out, x, guide, coeffs, weights, filters, conv):
    """Eq. 6-8 with the region scores from the factors or from materialised filters (``filters`` when the backward
    has made them already), whichever costs less."""
    kernel, stride, padding, dilation = conv
    batch, regions = guide.shape[:2]
    out_channels = weights[0].shape[1]
    taps = kernel[0] * kernel[1]
    positions = guide.shape[-2] * guide.shape[-1]
    if coeffs is not None and factored_scores_are_cheaper(regions, len(weights), out_channels, x.shape[1], taps,
                                                          positions):
        stacked = torch.stack(weights, dim=1).transpose(2, 3).reshape(-1, out_channels)  # (m * Q * C, O)
        scores = extension().stencil_region_scores(grad_out, stacked, x, coeffs, conv_args(*conv))
    else:
        if coeffs is None:
            filters = weights[0].view(1, regions, out_channels, x.shape[1], *kernel).expand(batch, -1, -1, -1, -1,
                                                                                             -1)
        elif filters is None:
            filters = _filters_from_factors(coeffs, weights, kernel)
        if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0):  # each region's product blockwise, in cache
            scores = extension().pointwise_region_scores(grad_out, x, _per_segment(filters)).view_as(guide)
        else:
            geometry = _Geometry.of(x, guide, filters, stride, padding, dilation)
            scores = _region_scores(geometry, x, filters, grad_out.flatten(2)).view_as(guide)
    return guide_gradient(guide, scores)
