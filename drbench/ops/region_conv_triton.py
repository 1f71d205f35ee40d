"""``region_conv2d`` as a Triton kernel (implementation ``"triton"``): a grouped GEMM over (sample, region) buckets.

The "fast" implementation gathers patches into tiles in memory, then multiplies them by batched matmuls; on a GPU
that round trip through memory costs more than the multiply-adds. Here one kernel reads each patch straight from
the unpadded input into registers (out-of-bounds taps masked to zero, which is the padding) and multiplies it by
its region's filter with ``tl.dot``, as mixture-of-experts kernels do with their experts: the positions are sorted
by bucket (sample, region), each bucket cut into tiles of ``BLOCK_P`` positions, and each program computes one
tile's ``BLOCK_O`` output channels. The multiply-adds are a convolution's plus the masked rest of each bucket's last
tile; nothing of size m * output is computed or held.

The bucketing runs on the device too, in two small kernels, without synchronising with the host (a ``.item()``
would stall the stream on every call) and without a sort: a sort-based tiling in torch ops launches dozens of
kernels, whose launch overhead alone exceeded the convolution's time. One kernel counts each sample's positions per
region and ranks them by atomic increments, the next writes them grouped by region. The convolution's grid holds an
upper bound of the tiles per sample (P / BLOCK_P + m); each program finds its bucket from the counts, and programs
past the sample's real tile count return at once.

Backward reuses the fast implementation's (torch ops, which run on CUDA too): exact gradients for ``x`` and
``filters`` through the selected filters, and the guide's approximate gradient of Eq. 6-8.

Triton is optional: without it this module registers nothing. The kernel runs on CUDA tensors, or on CPU tensors in
Triton's interpreter (``TRITON_INTERPRET=1``, slow; for tests).

>>> import torch
>>> from drbench.ops.functional import region_conv2d
>>> device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors need TRITON_INTERPRET=1
>>> x = torch.randn(2, 8, 10, 10, device=device)
>>> guide = torch.randn(2, 4, 10, 10, device=device)
>>> filters = torch.randn(2, 4, 16, 8, 3, 3, device=device)
>>> region_conv2d(x, guide, filters, padding=1, impl="triton").shape
torch.Size([2, 16, 10, 10])
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from drbench.ops.region_conv_base import register_region_conv_impl
from drbench.ops.region_conv_fast import bucket_layout, bucketed_backward, region_argmax

try:
    import triton
    import triton.language as tl
except ImportError:  # an optional implementation: without triton, "triton" is simply not registered
    triton = None

# Positions per tile: at most this many, so that a large bucket's accumulator stays in registers.
_MAX_BLOCK_P = 64
# tl.dot needs every block dimension to be at least 16.
_MIN_BLOCK = 16
# Positions per program of the bucketing kernels.
_BUCKETING_BLOCK = 1024


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``), read afresh on every call."""
    return triton is not None and triton.knobs.runtime.interpret


def runs_on(device_type: str) -> bool:
    """Whether the kernel can run here on tensors of ``device_type``: CUDA, or anything in the interpreter."""
    return triton is not None and (device_type == "cuda" or interpreting())


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: TF32 for float32 exactly when cuDNN convolutions use it, so that timings
    against ``F.conv2d`` compare like with like; IEEE otherwise (float64 has no TF32)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def block_positions(positions: int, regions: int) -> int:
    """BLOCK_P for P positions per sample over m regions: about the mean bucket (P / m), so that buckets of the
    mean size waste little of their last tile, as a power of two in [16, 64]."""
    mean_bucket = -(-positions // regions)
    return min(_MAX_BLOCK_P, max(_MIN_BLOCK, triton.next_power_of_2(mean_bucket)))


def _rank_kernel(mask_ptr, counts_ptr, rank_ptr, positions, REGIONS: tl.constexpr, BLOCK: tl.constexpr):
    """Count each sample's positions per region, and give each position its rank in its bucket. The ranks come
    from atomic increments, so their order within a bucket varies from run to run; the outputs do not (each is
    computed alone, in a fixed order over K)."""
    sample = tl.program_id(0)
    position = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = position < positions
    region = tl.load(mask_ptr + sample * positions + position, mask=valid, other=0)
    rank = tl.atomic_add(counts_ptr + sample * REGIONS + region, 1, mask=valid)
    tl.store(rank_ptr + sample * positions + position, rank, mask=valid)


def _scatter_kernel(mask_ptr, counts_ptr, rank_ptr, sorted_position_ptr, positions,
                    REGIONS: tl.constexpr, BLOCK: tl.constexpr):
    """Write each position into its sample's row of ``sorted_position``, grouped by region: bucket r starts after
    the positions of regions 0..r-1 (REGIONS is small: a loop of scalar loads beats a scan)."""
    sample = tl.program_id(0)
    position = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = position < positions
    region = tl.load(mask_ptr + sample * positions + position, mask=valid, other=0)
    slot = tl.load(rank_ptr + sample * positions + position, mask=valid, other=0)
    for earlier in tl.static_range(REGIONS):
        slot += tl.where(region > earlier, tl.load(counts_ptr + sample * REGIONS + earlier), 0)
    tl.store(sorted_position_ptr + sample * positions + slot, position, mask=valid)


def _region_conv_forward_kernel(
    x_ptr, filters_ptr, out_ptr, counts_ptr, sorted_position_ptr,
    height, width, out_width, positions, out_channels,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    f_stride_b, f_stride_m, f_stride_o, f_stride_c, f_stride_h, f_stride_w,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    REGIONS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PATCH_ROWS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """out[n, o, p] for one tile of positions p of one bucket (sample n, region r) and a block of channels o:
    the sum over k = (c, i, j) of filters[n, r, o, c, i, j] * x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw].

    Program (t, n, o-block) takes its sample's tile t, counting each bucket's tiles region by region; the grid
    holds an upper bound of the tiles per sample, and programs past the sample's real count return at once."""
    tile = tl.program_id(0)
    sample = tl.program_id(1)
    tiles_before = 0  # of the regions already counted
    positions_before = 0
    region = 0
    first_slot = 0
    end_slot = 0
    for bucket_region in tl.static_range(REGIONS):
        count = tl.load(counts_ptr + sample * REGIONS + bucket_region)
        tiles = (count + BLOCK_P - 1) // BLOCK_P
        here = (tile >= tiles_before) & (tile < tiles_before + tiles)
        region = tl.where(here, bucket_region, region)
        first_slot = tl.where(here, positions_before + (tile - tiles_before) * BLOCK_P, first_slot)
        end_slot = tl.where(here, positions_before + count, end_slot)
        tiles_before += tiles
        positions_before += count
    if tile >= tiles_before:
        return
    slots = first_slot + tl.arange(0, BLOCK_P)
    in_tile = slots < end_slot
    position = tl.load(sorted_position_ptr + sample * positions + slots, mask=in_tile, other=0)
    row_origin = (position // out_width) * stride_h - pad_h  # the patch's top-left corner, maybe in the padding
    col_origin = (position % out_width) * stride_w - pad_w
    channel = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    in_channels = channel < out_channels

    # int64 for the per-sample bases: a batch may hold more than 2**31 elements, one sample does not.
    x_sample = x_ptr + sample.to(tl.int64) * x_stride_b
    filter_rows = (filters_ptr + sample.to(tl.int64) * f_stride_b + region * f_stride_m
                   + channel[:, None] * f_stride_o)
    acc = tl.full((BLOCK_O, BLOCK_P), 0, dtype=ACC_DTYPE)  # not tl.zeros: see _kernels
    # PATCH_ROWS = C * kh * kw is a constexpr: the compiler drops the mask below where BLOCK_K divides it, and
    # Triton 3.6's interpreter cannot loop to a runtime bound under numpy >= 2.4.
    for first_k in range(0, PATCH_ROWS, BLOCK_K):
        k = first_k + tl.arange(0, BLOCK_K)  # patch row k = (c, i, j) in filter order
        in_patch = k < PATCH_ROWS
        c = k // (KH * KW)
        i = k // KW % KH
        j = k % KW
        weight = tl.load(filter_rows + (c * f_stride_c + i * f_stride_h + j * f_stride_w)[None, :],
                         mask=in_channels[:, None] & in_patch[None, :], other=0.0)
        rows = row_origin[None, :] + (i * dilation_h)[:, None]
        cols = col_origin[None, :] + (j * dilation_w)[:, None]
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        patch = tl.load(x_sample + c[:, None] * x_stride_c + rows * x_stride_h + cols * x_stride_w,
                        mask=inside & in_patch[:, None] & in_tile[None, :], other=0.0)
        acc = tl.dot(weight, patch, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    out = out_ptr + sample.to(tl.int64) * out_channels * positions + channel[:, None] * positions + position[None, :]
    tl.store(out, acc, mask=in_channels[:, None] & in_tile[None, :])


if triton is not None:
    # BLOCK_P is not tuned: the grid is sized for it before the launch (block_positions).
    _COMPILED_CONFIGS = [
        triton.Config({"BLOCK_O": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_O": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_O": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_O": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    ]
    # The interpreter would time every config it is given; one, small enough that tests cross block edges.
    _INTERPRETED_CONFIGS = [triton.Config({"BLOCK_O": 16, "BLOCK_K": 16})]


class _Kernels(NamedTuple):
    rank: Any
    scatter: Any
    conv: Any


@functools.cache
def _kernels(interpreted: bool) -> _Kernels:
    """The kernels, compiled or interpreted. ``triton.jit`` picks the interpreter when it decorates, from the
    environment at that moment, so each mode is decorated when first used rather than at import: a process may
    import this module before it sets TRITON_INTERPRET (as a test session does). triton.language's own jit'd
    helpers (``tl.zeros``, ``tl.sum``, ``tl.cumsum``) were decorated when triton was imported, so the kernels call
    builtins only: the interpreter cannot run compiled-mode helpers."""
    configs = _INTERPRETED_CONFIGS if interpreted else _COMPILED_CONFIGS
    tune = triton.autotune(configs, key=["out_channels", "PATCH_ROWS", "BLOCK_P", "KH", "KW"])
    return _Kernels(triton.jit(_rank_kernel), triton.jit(_scatter_kernel),
                    tune(triton.jit(_region_conv_forward_kernel)))


def bucket_positions(mask: torch.Tensor, regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group each sample's positions by region, on the device and without synchronising with the host (a
    ``.item()`` would stall the stream on every call): ``mask`` (B, P), region indices, gives ``counts`` (B, m) and
    ``sorted_position`` (B, P), each row the sample's positions of region 0, then region 1, and so on."""
    batch, positions = mask.shape
    kernels = _kernels(interpreting())
    counts = torch.zeros(batch, regions, dtype=torch.int32, device=mask.device)
    rank = torch.empty(batch, positions, dtype=torch.int32, device=mask.device)
    sorted_position = torch.empty_like(rank)
    grid = (batch, triton.cdiv(positions, _BUCKETING_BLOCK))
    kernels.rank[grid](mask, counts, rank, positions, REGIONS=regions, BLOCK=_BUCKETING_BLOCK)
    kernels.scatter[grid](mask, counts, rank, sorted_position, positions, REGIONS=regions, BLOCK=_BUCKETING_BLOCK)
    return counts, sorted_position


def triton_region_conv2d(x: torch.Tensor, guide: torch.Tensor, filters: torch.Tensor, stride: tuple[int, int],
                         padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """The forward of region_conv2d by the Triton kernels, (B, O, H', W'); any layout of ``x`` and ``filters``."""
    batch, regions, out_channels, channels, kh, kw = filters.shape
    out_height, out_width = guide.shape[-2:]
    positions = out_height * out_width
    block_p = block_positions(positions, regions)
    counts, sorted_position = bucket_positions(region_argmax(guide), regions)
    out = x.new_empty(batch, out_channels, out_height, out_width)
    # Tiles per sample: sum over regions of ceil(count / BLOCK_P) < P / BLOCK_P + m. The batch goes on the grid's
    # second axis, which CUDA caps at 65535 samples.
    most_tiles = triton.cdiv(positions, block_p) + regions

    def grid(meta):
        return most_tiles, batch, triton.cdiv(out_channels, meta["BLOCK_O"])

    _kernels(interpreting()).conv[grid](
        x, filters, out, counts, sorted_position,
        x.shape[2], x.shape[3], out_width, positions, out_channels,
        *x.stride(), *filters.stride(), *stride, *padding, *dilation,
        REGIONS=regions, KH=kh, KW=kw, PATCH_ROWS=channels * kh * kw, BLOCK_P=block_p,
        ACC_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32,
        INPUT_PRECISION=dot_precision(x.dtype),
    )
    return out


def _require_runnable(device_type: str) -> None:
    if not runs_on(device_type):
        raise RuntimeError(
            f"region_conv2d: the triton implementation needs CUDA tensors (or TRITON_INTERPRET=1 to run Triton's "
            f"interpreter), got {device_type} tensors"
        )


class RegionConv2dTriton(torch.autograd.Function):
    """Forward by the Triton kernels; backward by the fast implementation's tiles (see the module's docstring)."""

    @staticmethod
    def forward(ctx, x, guide, filters, stride, padding, dilation):
        _require_runnable(x.device.type)
        ctx.save_for_backward(x, guide, filters)
        ctx.conv_args = (stride, padding, dilation)
        return triton_region_conv2d(x, guide, filters, stride, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, guide, filters = ctx.saved_tensors
        filters = filters.contiguous()  # the fast backward views them flat
        tiles, geometry, _ = bucket_layout(x, guide, filters, *ctx.conv_args)
        grads = bucketed_backward(grad_out, x, guide, filters, tiles, geometry, ctx.needs_input_grad[:3])
        return (*grads, None, None, None)


if triton is not None:
    register_region_conv_impl("triton", runs_on=runs_on)(RegionConv2dTriton)
