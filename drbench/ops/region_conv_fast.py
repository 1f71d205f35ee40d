"""FLOP-proportional ``region_conv2d`` (implementation ``"fast"``): each position is computed with its own filter only.

The reference computes every region's output everywhere (m convolutions). Here the output positions are bucketed
by (sample, region) and laid out in tiles of T slots; a tile is one matrix product of its region's filter
(O, C*kh*kw) with the patches of its positions (C*kh*kw, T), and many tiles go through each batched matmul. The
multiply-adds are a convolution's plus the padding of each bucket's last tile. Patches are gathered
straight from the (padded) input into tile order, a chunk of samples at a time, so a k x k kernel never holds the
whole im2col and each chunk's patches are still in cache when the matmul reads them.

Backward: ``x`` and ``filters`` get exact gradients through the same tiles (only the selected filter at each
position). The guide's gradient (Eq. 6-8) needs every region's response at every position, which is inherently m
convolutions of work: one batched matmul of all m filters with the patches per chunk of samples and a reduction
over output channels, then :func:`guide_gradient`.

>>> import torch
>>> from drbench.ops.functional import region_conv2d
>>> x, guide, filters = torch.randn(2, 8, 10, 10), torch.randn(2, 4, 10, 10), torch.randn(2, 4, 16, 8, 3, 3)
>>> region_conv2d(x, guide, filters, padding=1, impl="fast").shape
torch.Size([2, 16, 10, 10])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from drbench.ops.region_conv_base import guide_gradient, register_region_conv_impl

# Tile sizes are rounded up to a multiple of this: the batched matmul runs markedly faster on such widths.
_TILE_ALIGN = 8
# Split buckets get tiles of about the mean bucket, but no fewer slots than this (tiny matmuls, a filter copy each).
_MIN_SPLIT_TILE = 16
# A split tile needs its own copy of its filter; copying costs about as much time as this many slots of matmul.
_FILTER_COPY_SLOTS = 16
# Most elements of gathered patches at once: about 4 MB in float32, so they are still in the last-level cache when
# the matmul reads them. Smaller inputs get less: at most half their input and output, which keeps the forward's
# extra memory within a small multiple of its input and output, however large the kernel. A sample whose patches
# exceed it is done a part of its tiles at a time.
_CHUNK_ELEMENTS = 1 << 20
# On CPU, samples are grouped into chunks of about this many patch elements (1 MB in float32, a core's L2 here):
# a smaller chunk's largest bucket, which sets its tile width, is smaller, so fewer slots are padding. At the 1x1
# benchmark shape (2 samples a chunk instead of 11) the forward went from 2.30x to 2.12x conv (median of 40 rounds);
# grouping never splits a sample (splitting made the 3x3 shape slower: 3.35x against 2.79x).
_GROUP_ELEMENTS = 1 << 18


def _round_up(value, multiple: int):
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class TileChunk:
    """Consecutive samples whose tiles, all of ``size`` slots, are computed together.

    ``samples``, ``buckets``, ``tiles`` and ``slots`` are [first, last) ranges into the batch, its buckets and the
    flat arrays of :class:`RegionTiles`. ``split`` is False when tile i of the chunk is its bucket i.
    """

    samples: tuple[int, int]
    buckets: tuple[int, int]
    tiles: tuple[int, int]
    slots: tuple[int, int]
    size: int
    split: bool

    @property
    def tile_count(self) -> int:
        return self.tiles[1] - self.tiles[0]


@dataclass(frozen=True)
class RegionTiles:
    """The output positions of a batch grouped by (sample, region) into tiles, tiles grouped into chunks.

    Tiles are ordered by sample, then region. Flat arrays (P = H' * W' positions per sample):

    - ``slot_position`` (slots,): the position (0..P-1, within its sample) each slot computes; 0 on padding.
    - ``slot_sample`` (slots,): the sample of each slot's position; 0 on padding.
    - ``slot_valid`` (slots,): False on the padding slots that fill a bucket's last tile.
    - ``position_slot`` (B, P): the slot computing each position, counted from its chunk's first slot.
    - ``tile_bucket`` (tiles,): the bucket (sample * m + region) of each tile.
    """

    slot_position: torch.Tensor
    slot_sample: torch.Tensor
    slot_valid: torch.Tensor
    position_slot: torch.Tensor
    tile_bucket: torch.Tensor
    chunks: list[TileChunk]


def region_argmax(guide: torch.Tensor) -> torch.Tensor:
    """The selected region at each position, (B, m, H', W') -> (B, H' * W'), ties to the lowest index like argmax.

    ``max(dim=1).indices`` gives argmax's answer (ties and NaN included) several times faster on CPU, where
    ``argmax(dim=1)`` is a slow strided reduction.
    """
    return guide.flatten(2).max(dim=1).indices


def tile_positions(mask: torch.Tensor, regions: int, samples_per_chunk: int) -> RegionTiles:
    """Group the positions of ``mask`` (B, P), region indices in [0, regions), into tiles, chunk by chunk.

    Within a chunk, either each bucket is one tile of T = the chunk's largest bucket (no filter copies; little
    waste when regions are about equal), or buckets are split into tiles of about the mean bucket (a filter copy
    per tile; little waste when one region dominates). The cheaper layout wins.

    The layout of tiles is planned on the bucket counts in Python (B * m numbers); the positions then need only a
    sort and a handful of whole-batch operations: a bucket's tiles are consecutive and equally wide, so the k-th
    position of a bucket lands in slot ``first_slot(bucket) + k``.
    """
    batch, positions = mask.shape
    device = mask.device
    key = (mask + torch.arange(batch, device=device)[:, None] * regions).flatten()
    counts = torch.bincount(key, minlength=batch * regions)
    chunks, bucket_first_slot, tile_bucket = _plan_chunks(counts.tolist(), batch, regions, positions,
                                                          samples_per_chunk)
    sorted_key, order = _sort_by_bucket(key, batch * regions)
    # slot of the i-th position in sorted order: i + (first slot of its bucket - first sorted index of its bucket)
    bucket_shift = torch.tensor(bucket_first_slot, device=device) - (torch.cumsum(counts, 0) - counts)
    slot = torch.arange(key.numel(), device=device) + bucket_shift.index_select(0, sorted_key)
    slot_count = chunks[-1].slots[1]
    slot_flat = torch.full((slot_count,), -1, dtype=torch.long, device=device).scatter_(0, slot, order)
    slot_valid = slot_flat >= 0
    slot_flat.clamp_(min=0)  # padding slots read position 0 of sample 0; what they compute is never used
    chunk_first_slot = torch.tensor([chunk.slots[0] for chunk in chunks], device=device)
    slot -= chunk_first_slot.index_select(0, sorted_key // (regions * samples_per_chunk))
    return RegionTiles(
        slot_valid=slot_valid,
        slot_position=slot_flat % positions,
        slot_sample=slot_flat // positions,
        position_slot=torch.empty_like(slot).scatter_(0, order, slot).view(batch, positions),
        tile_bucket=torch.tensor(tile_bucket, device=device),
        chunks=chunks,
    )


def _sort_by_bucket(key: torch.Tensor, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(key)``'s values and indices. On CPU with keys below 2**16, NumPy's stable sort of uint16 is a
    radix sort, several times faster than torch's comparison sort; where positions land within a bucket does not
    matter, only that each bucket's positions are consecutive."""
    if key.device.type != "cpu" or buckets > 1 << 16:
        return torch.sort(key)
    order = torch.from_numpy(numpy.argsort(key.numpy().astype(numpy.uint16), kind="stable"))
    return key.index_select(0, order), order


def _plan_chunks(counts: list[int], batch: int, regions: int, positions: int, samples_per_chunk: int):
    """The chunks' tile layout from the bucket counts: (chunks, first slot of each bucket, bucket of each tile)."""
    split_size = _round_up(max(_MIN_SPLIT_TILE, -(-positions // regions)), _TILE_ALIGN)
    chunks, bucket_first_slot, tile_bucket = [], [], []
    for first in range(0, batch, samples_per_chunk):
        last = min(batch, first + samples_per_chunk)
        buckets = range(first * regions, last * regions)
        one_tile = _round_up(max(counts[b] for b in buckets), _TILE_ALIGN)
        split_tiles = [-(-counts[b] // split_size) for b in buckets]
        split = sum(split_tiles) * (split_size + _FILTER_COPY_SLOTS) < one_tile * len(buckets)
        size = split_size if split else one_tile
        first_tile, first_slot = len(tile_bucket), chunks[-1].slots[1] if chunks else 0
        for bucket, tiles in zip(buckets, split_tiles if split else [1] * len(buckets)):
            bucket_first_slot.append(first_slot + (len(tile_bucket) - first_tile) * size)
            tile_bucket.extend([bucket] * tiles)
        chunks.append(TileChunk(
            samples=(first, last),
            buckets=(buckets.start, buckets.stop),
            tiles=(first_tile, len(tile_bucket)),
            slots=(first_slot, first_slot + (len(tile_bucket) - first_tile) * size),
            size=size,
            split=split,
        ))
    return chunks, bucket_first_slot, tile_bucket


@dataclass(frozen=True)
class _Geometry:
    """Where the patch of each output position lies in the flattened padded input (B, C, Hp * Wp)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    input_size: tuple[int, int]
    offsets: torch.Tensor  # (kh * kw,) of each kernel tap from the patch's top-left corner, in filter order
    position_base: torch.Tensor  # (P,) the patch's top-left corner of each output position

    @classmethod
    def of(cls, x, guide, filters, stride, padding, dilation) -> "_Geometry":
        kernel = tuple(filters.shape[-2:])
        padded_width = x.shape[-1] + 2 * padding[1]
        device = x.device
        rows = torch.arange(kernel[0], device=device)[:, None] * dilation[0] * padded_width
        offsets = (rows + torch.arange(kernel[1], device=device) * dilation[1]).flatten()
        out_rows = torch.arange(guide.shape[-2], device=device)[:, None] * stride[0] * padded_width
        position_base = (out_rows + torch.arange(guide.shape[-1], device=device) * stride[1]).flatten()
        return cls(kernel, stride, padding, dilation, tuple(x.shape[-2:]), offsets, position_base)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) zero-padded and flattened to (B, C, Hp * Wp)."""
        pad_h, pad_w = self.padding
        if pad_h or pad_w:
            x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
        return x.contiguous().flatten(2)

    @property
    def is_pointwise(self) -> bool:
        """True when patches are the input itself: a 1x1 kernel, stride 1, no padding."""
        return self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """Patches of every output position, (B, C, H, W) -> (B, C * kh * kw, P) in filter order."""
        if self.is_pointwise:
            return x.flatten(2)
        return F.unfold(x, self.kernel, self.dilation, self.padding, self.stride)

    def fold(self, columns: torch.Tensor) -> torch.Tensor:
        """Sum per-position patch gradients (B, C * kh * kw, P) back onto the input (B, C, H, W)."""
        if self.is_pointwise:
            return columns.view(columns.shape[0], -1, *self.input_size)
        return F.fold(columns, self.input_size, self.kernel, self.dilation, self.padding, self.stride)


def slot_starts(tiles: RegionTiles, source: torch.Tensor, position_base=None) -> torch.Tensor:
    """Where each slot's column starts in ``source`` (B, R, L) as :func:`_gather_columns` reads it: column
    ``b * R * L + l`` of each row holds ``source[b, r, l]``, and slot s starts at ``l = base(position(s))``
    (``position_base`` of the position, the position itself when None). Computed once per call, for all chunks."""
    base = tiles.slot_position if position_base is None else position_base.index_select(0, tiles.slot_position)
    return base + tiles.slot_sample * source[0].numel()


def _gather_columns(source, starts, chunk: TileChunk, part, offsets=None):
    """Columns of ``source`` (B, R, L) in tile order for the tiles ``part`` (a [first, last) range within ``chunk``):
    (tiles, R * K, T), where the column of slot s holds ``source[sample(s), :, start(s) + offsets[k]]`` for each of
    the K offsets (R-major, like a filter; one zero offset when None). ``starts``: :func:`slot_starts`.

    One gather reads all the samples, through a view that puts ``source[b, r, l]`` at column ``b * R * L + l`` of
    row r.
    """
    batch, rows, length = source.shape
    count = part[1] - part[0]
    index = starts[chunk.slots[0] + part[0] * chunk.size:chunk.slots[0] + part[1] * chunk.size].view(count, 1, -1)
    if offsets is not None:
        index = (index + offsets[:, None]).view(count, 1, -1)
    every_sample = source.as_strided((count, rows, batch * rows * length - (rows - 1) * length), (0, length, 1))
    return torch.gather(every_sample, 2, index.expand(-1, rows, -1)).view(count, -1, chunk.size)


def tiled_offsets(tiles: RegionTiles, rows: int) -> torch.Tensor:
    """Where each position's column lies in its chunk's tiled buffer (tiles, ``rows``, T), (B, P): for
    :func:`_scatter_columns`. Computed once per call, for all chunks."""
    size = torch.tensor([chunk.size for chunk in tiles.chunks for _ in range(*chunk.samples)],
                        device=tiles.position_slot.device)[:, None]
    return (tiles.position_slot // size) * (rows * size) + tiles.position_slot % size


def _scatter_columns(tiled, offsets, out=None):
    """Inverse of the tiling: ``tiled`` (tiles, R, T) back to position order (B, R, P) for the chunk's samples,
    whose columns lie at ``offsets`` (B, P) (the chunk's rows of :func:`tiled_offsets`)."""
    tile_count, rows, size = tiled.shape
    every_tile = tiled.as_strided((offsets.shape[0], rows, (tile_count - 1) * rows * size + size), (0, size, 1))
    return torch.gather(every_tile, 2, offsets[:, None].expand(-1, rows, -1), out=out)


def _chunk_filters(filters_flat, tiles: RegionTiles, chunk: TileChunk, part):
    """The filter (O, C * kh * kw) of each tile of ``part`` (a range within ``chunk``): a view of ``filters_flat``
    unless buckets were split."""
    if chunk.split:
        return filters_flat.index_select(0, tiles.tile_bucket[chunk.tiles[0] + part[0]:chunk.tiles[0] + part[1]])
    return filters_flat[chunk.buckets[0] + part[0]:chunk.buckets[0] + part[1]]


def _chunk_budget(in_elements: int, out_elements: int) -> int:
    """Most elements of gathered patches to hold at once (see _CHUNK_ELEMENTS)."""
    return max(1, min(_CHUNK_ELEMENTS, (in_elements + out_elements) // 2))


def _tile_parts(chunk: TileChunk, rows: int, budget: int):
    """[first, last) tile ranges of ``chunk`` whose patches (``rows`` x T each) fit ``budget``; the whole chunk
    unless one sample alone exceeds it."""
    step = max(1, budget // (rows * chunk.size))
    return [(first, min(chunk.tile_count, first + step)) for first in range(0, chunk.tile_count, step)]


@register_region_conv_impl("fast")
class RegionConv2dFast(torch.autograd.Function):
    """Bucketed implementation: a convolution's multiply-adds forward, exact gradients for ``x`` and ``filters``.

    Beyond its output, the forward holds at once a chunk's tiled output, gathered patches (at most 2**20 elements
    or half the input plus output, whichever is smaller, but at least one tile's), the tiling's index arrays (a few
    int64 per output position) and, when padding > 0, a padded copy of the input.
    """

    @staticmethod
    def forward(ctx, x, guide, filters, stride, padding, dilation):
        batch, regions, out_channels = filters.shape[:3]
        filters = filters.contiguous()  # once, for forward and backward (a generator may give them region-major)
        tiles, geometry, budget = bucket_layout(x, guide, filters, stride, padding, dilation)
        out = _tiled_forward(x, tiles, geometry, filters.reshape(batch * regions, out_channels, -1), budget)
        ctx.save_for_backward(x, guide, filters)
        ctx.tiles, ctx.geometry = tiles, geometry
        return out.view(batch, out_channels, *guide.shape[-2:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, guide, filters = ctx.saved_tensors
        grads = bucketed_backward(grad_out, x, guide, filters, ctx.tiles, ctx.geometry, ctx.needs_input_grad[:3])
        return (*grads, None, None, None)


def bucket_layout(x, guide, filters, stride, padding, dilation) -> tuple[RegionTiles, _Geometry, int]:
    """How this implementation lays out a call: the tiles of its positions, in chunks of samples (about
    _GROUP_ELEMENTS patch elements each on CPU, the budget elsewhere); where its patches lie in the input; and the
    budget of patch elements held at once (see _CHUNK_ELEMENTS), which splits a chunk into parts where it has more."""
    batch, regions, out_channels = filters.shape[:3]
    positions = guide.shape[-2] * guide.shape[-1]
    budget = _chunk_budget(x.numel(), batch * out_channels * positions)
    patch_rows = filters[0, 0].numel() // out_channels
    group = _GROUP_ELEMENTS if x.device.type == "cpu" else budget  # a GPU gains from fewer, larger launches instead
    per_chunk = max(1, min(batch, group // (patch_rows * positions)))
    tiles = tile_positions(region_argmax(guide), regions, per_chunk)
    return tiles, _Geometry.of(x, guide, filters, stride, padding, dilation), budget


def bucketed_backward(grad_out, x, guide, filters, tiles: RegionTiles, geometry: _Geometry,
                      needs_input_grad: tuple[bool, bool, bool]):
    """The gradients of ``x``, ``guide`` and ``filters`` (contiguous), each None unless ``needs_input_grad`` asks for
    it, given ``grad_out`` (B, O, H', W') and the layout of :func:`bucket_layout`: exact ones for ``x`` and
    ``filters`` through the tiles, the paper's approximation for the guide."""
    need_x, need_guide, need_filters = needs_input_grad
    grad_out = grad_out.contiguous().flatten(2)  # (B, O, P)
    grad_x = torch.empty_like(x) if need_x else None
    grad_filters = None
    if need_filters:  # a chunk of unsplit buckets writes its filters' gradient whole; split ones add to it
        grad_filters = (torch.zeros_like if any(c.split for c in tiles.chunks) else torch.empty_like)(filters)
    if need_x or need_filters:
        _tiled_backward(grad_out, x, tiles, geometry, filters, grad_x, grad_filters)
    grad_guide = None
    if need_guide:
        grad_guide = guide_gradient(guide, _region_scores(geometry, x, filters, grad_out).view_as(guide))
    return grad_x, grad_guide, grad_filters


def _tiled_forward(x, tiles: RegionTiles, geometry: _Geometry, filters_flat, budget: int) -> torch.Tensor:
    """The output (B, O, P), chunk by chunk: gather a part's patches, multiply them by their tiles' filters, and
    scatter the chunk's tiled output into place."""
    source = geometry.padded(x)
    starts = slot_starts(tiles, source, geometry.position_base)
    out_channels = filters_flat.shape[1]
    out_offsets = tiled_offsets(tiles, out_channels)
    out = x.new_empty(x.shape[0], out_channels, out_offsets.shape[1])
    for chunk in tiles.chunks:
        tiled = out.new_empty(chunk.tile_count, out_channels, chunk.size)
        for part in _tile_parts(chunk, filters_flat.shape[-1], budget):
            patches = _gather_columns(source, starts, chunk, part, geometry.offsets)
            torch.bmm(_chunk_filters(filters_flat, tiles, chunk, part), patches, out=tiled[part[0]:part[1]])
            del patches  # before the next part's are gathered
        first, last = chunk.samples
        _scatter_columns(tiled, out_offsets[first:last], out=out[first:last])
    return out


def _tiled_backward(grad_out, x, tiles: RegionTiles, geometry: _Geometry, filters, grad_x, grad_filters) -> None:
    """The gradients of ``x`` and ``filters`` into ``grad_x`` and ``grad_filters`` (where not None), chunk by
    chunk, through the tiles: only the selected filter at each position."""
    batch, regions, out_channels = filters.shape[:3]
    filters_flat = filters.reshape(batch * regions, out_channels, -1)
    grad_starts = slot_starts(tiles, grad_out)
    if grad_filters is not None:
        source = geometry.padded(x)
        starts = slot_starts(tiles, source, geometry.position_base)
    if grad_x is not None:
        patch_offsets = tiled_offsets(tiles, filters_flat.shape[-1])
    for chunk in tiles.chunks:
        whole = (0, chunk.tile_count)
        tiled_grad = _gather_columns(grad_out, grad_starts, chunk, whole)  # (tiles, O, T)
        valid = tiles.slot_valid[chunk.slots[0]:chunk.slots[1]].view(chunk.tile_count, 1, chunk.size)
        # Padding slots must not add to the filters' gradient. Multiplying by the mask is several times faster than
        # masked_fill; it differs only where grad_out is not finite, whose gradients are lost anyway.
        tiled_grad.mul_(valid.to(tiled_grad.dtype))
        if grad_filters is not None:
            patches = _gather_columns(source, starts, chunk, whole, geometry.offsets)
            grad_flat = grad_filters.view_as(filters_flat)
            if chunk.split:
                grad_tiles = torch.bmm(tiled_grad, patches.transpose(1, 2))
                grad_flat.index_add_(0, tiles.tile_bucket[chunk.tiles[0]:chunk.tiles[1]], grad_tiles)
            else:
                torch.bmm(tiled_grad, patches.transpose(1, 2), out=grad_flat[chunk.buckets[0]:chunk.buckets[1]])
        if grad_x is not None:
            tiled_patch_grad = torch.bmm(_chunk_filters(filters_flat, tiles, chunk, whole).transpose(1, 2), tiled_grad)
            first, last = chunk.samples
            grad_x[first:last] = geometry.fold(_scatter_columns(tiled_patch_grad, patch_offsets[first:last]))


def _region_scores(geometry, x, filters, grad_out):
    """g of Eq. 7, (B, m, P): for each region j, the sum over output channels of grad_out times the output that
    filter j gives at each position. That is m convolutions of work, done as one batched matmul per chunk of
    samples (a convolution with the batch folded into groups is far slower on CPU), on whichever side is narrower:

    - outputs: every filter's output (m*O, P) = filters (m*O, C*k*k) @ patches, times grad_out, summed over O;
    - patches: the patch gradient of every filter (m*C*k*k, P) = filters^T @ grad_out, times the patches, summed
      over C*k*k (the same number; fewer rows when O > C*k*k, as in an expanding 1x1 conv).

    The product is taken in place: allocating a second buffer of that size costs more than the multiply.
    """
    batch, regions, out_channels = filters.shape[:3]
    positions = grad_out.shape[-1]
    patch_rows = filters[0, 0].numel() // out_channels
    by_outputs = out_channels <= patch_rows
    rows = out_channels if by_outputs else patch_rows
    scores = grad_out.new_empty(batch, regions, positions)
    per_chunk = max(1, min(batch, _CHUNK_ELEMENTS // (regions * rows * positions)))
    for first in range(0, batch, per_chunk):
        chunk = slice(first, first + per_chunk)
        stacked = filters[chunk].flatten(3)  # (b, m, O, C*k*k)
        patches = geometry.unfold(x[chunk])
        if by_outputs:
            every = torch.bmm(stacked.flatten(1, 2), patches).view(-1, regions, rows, positions)
            every.mul_(grad_out[chunk, None])
        else:  # a batched matmul copies either the transposed filters or grad_out once per region: the smaller
            transposed = stacked.transpose(2, 3)
            if patch_rows <= positions:
                every = torch.bmm(transposed.flatten(1, 2), grad_out[chunk]).view(-1, regions, rows, positions)
            else:
                every = torch.matmul(transposed, grad_out[chunk, None])
            every.mul_(patches[:, None])
        torch.sum(every, 2, out=scores[chunk])
    return scores
