"""The bucketed ("fast") region_conv2d against the reference: outputs, all three gradients, and its tiling."""

import pytest
import torch

import drbench.ops.region_conv_fast as fast
from drbench.ops import region_conv_cpu
from drbench.ops.functional import default_region_conv_impl, region_conv2d, region_conv_impls
from test_region_conv import make_inputs as reference_test_inputs  # same case format as the reference's tests

# (C, O, H, W, k, stride, padding, dilation, m)
CASES = [
    (5, 4, 7, 6, 1, 1, 0, 1, 1),
    (6, 7, 9, 8, 1, 1, 0, 1, 3),
    (4, 3, 10, 9, 1, 2, 0, 1, 8),
    (3, 5, 8, 8, 1, 1, 1, 1, 16),
    (3, 6, 8, 8, 3, 1, 1, 1, 8),
    (3, 6, 9, 8, 3, 2, 1, 1, 5),
    (4, 3, 9, 9, 3, 1, 2, 2, 2),
    (2, 5, 8, 7, 3, 1, 0, 1, 16),
    (3, 4, 11, 10, 5, 2, 2, 1, 4),
    (6, 9, 2, 2, 1, 1, 0, 1, 3),  # O > C and fewer positions than C: Eq. 7's scores go through the patches side
]
CASE_IDS = ["C{}O{}_{}x{}_k{}_s{}_p{}_d{}_m{}".format(*case) for case in CASES]


def make_inputs(case, dtype=torch.float64, batch=3, guide_bias=None):
    """x, guide and filters for ``case`` (not requiring grad); ``guide_bias`` (m,) is added to the guide to make the
    regions uneven."""
    tensors, conv_args = reference_test_inputs(case, dtype=dtype, batch=batch)
    x, guide, filters = (t.detach() for t in tensors)
    if guide_bias is not None:
        guide = guide + torch.as_tensor(guide_bias, dtype=dtype).view(1, -1, 1, 1)
    return (x, guide, filters), conv_args


def outputs_and_gradients(impl, tensors, conv_args, grad_seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = region_conv2d(*leaves, *conv_args, impl=impl)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, leaves, grad_out.to(out.device)))


def assert_matches_reference(tensors, conv_args, rtol, atol, impl="fast"):
    got = outputs_and_gradients(impl, tensors, conv_args)
    want = outputs_and_gradients("reference", tensors, conv_args)
    for name, g, w in zip(("output", "grad x", "grad guide", "grad filters"), got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of one or two samples even at test sizes, so the multi-chunk paths run."""
    monkeypatch.setattr(fast, "_CHUNK_ELEMENTS", 400)
    monkeypatch.setattr(fast, "_GROUP_ELEMENTS", 400)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float64_matches_reference_tightly(case):
    assert_matches_reference(*make_inputs(case), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES[1::2], ids=CASE_IDS[1::2])
def test_float32_matches_reference(case):
    assert_matches_reference(*make_inputs(case, dtype=torch.float32), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", [CASES[2], CASES[5]], ids=[CASE_IDS[2], CASE_IDS[5]])
def test_uneven_and_empty_regions_in_several_chunks(case, small_chunks):
    regions = case[-1]
    dominant = [4.0] + [0.0] * (regions - 1)  # region 0 takes most positions
    assert_matches_reference(*make_inputs(case, guide_bias=dominant), rtol=1e-10, atol=1e-10)
    never = [0.0] * (regions - 2) + [-50.0, -50.0]  # the last two regions are selected nowhere
    assert_matches_reference(*make_inputs(case, guide_bias=never), rtol=1e-10, atol=1e-10)


def test_one_region_everywhere_splits_buckets_and_still_matches(small_chunks):
    case = (3, 4, 12, 12, 3, 1, 1, 1, 8)
    bias = [0.0] * 7 + [100.0]
    (x, guide, filters), conv_args = make_inputs(case, batch=2, guide_bias=bias)
    tiles = fast.tile_positions(fast.region_argmax(guide), 8, samples_per_chunk=1)
    assert all(chunk.split for chunk in tiles.chunks)
    assert_matches_reference((x, guide, filters), conv_args, rtol=1e-10, atol=1e-10)


GRADCHECK_CASES = [(4, 3, 6, 5, 1, 1, 0, 1, 3), (3, 2, 6, 5, 3, 2, 1, 1, 4), (2, 3, 7, 7, 3, 1, 2, 2, 2)]


@pytest.fixture
def one_thread():
    """gradcheck runs thousands of forwards on tiny tensors: a second thread only adds synchronisation, which on a
    busy machine costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: "k{4}_s{5}_p{6}_d{7}_m{8}".format(*c))
def test_gradcheck_of_x_and_filters(case, one_thread):
    """Exact gradients; the guide is fixed with well separated values, so no perturbation changes the argmax."""
    (x, guide, filters), conv_args = make_inputs(case, batch=2)
    guide = guide.argsort(dim=1).double() * 10.0

    def fn(x_, filters_):
        return region_conv2d(x_, guide, filters_, *conv_args, impl="fast")

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), filters.requires_grad_()), eps=1e-6, atol=1e-6)


def test_non_contiguous_inputs():
    (x, guide, filters), conv_args = make_inputs(CASES[5])
    x_cl = x.contiguous(memory_format=torch.channels_last)
    guide_t = guide.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(
        region_conv2d(x_cl, guide_t, filters, *conv_args, impl="fast"),
        region_conv2d(x, guide, filters, *conv_args, impl="reference"),
    )


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (0, 2)], ids=["x", "guide", "filters", "x+filters"])
def test_only_the_requested_gradients(wanted):
    tensors, conv_args = make_inputs(CASES[5])
    expected = outputs_and_gradients("reference", tensors, conv_args)[1:]
    leaves = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(tensors)]
    out = region_conv2d(*leaves, *conv_args, impl="fast")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out)
    for i, grad in zip(wanted, grads):
        torch.testing.assert_close(grad, expected[i], rtol=1e-10, atol=1e-10)


def test_region_argmax_is_argmax_with_ties_to_the_lowest_region():
    guide = torch.randn(2, 6, 5, 4)
    guide[0, :, 1, 1] = 3.0  # all tied
    guide[1, [2, 4], 2, 3] = 9.0  # two tied maxima
    expected = guide.argmax(dim=1).flatten(1)
    assert torch.equal(fast.region_argmax(guide), expected)
    assert fast.region_argmax(guide)[0, 5] == 0 and fast.region_argmax(guide)[1, 11] == 2


@pytest.mark.parametrize("bias", [None, [3.0, 0, 0, 0, 0], [0, 0, 0, -60.0, -60.0]])
@pytest.mark.parametrize("per_chunk", [1, 2, 5])
def test_tiling_places_every_position_once_in_a_tile_of_its_bucket(bias, per_chunk):
    batch, regions, positions = 5, 5, 90
    gen = torch.Generator().manual_seed(3)
    guide = torch.randn(batch, regions, positions, 1, generator=gen)
    if bias is not None:
        guide = guide + torch.tensor(bias).view(1, regions, 1, 1)
    mask = fast.region_argmax(guide)
    tiles = fast.tile_positions(mask, regions, per_chunk)
    assert [chunk.samples for chunk in tiles.chunks] == [
        (first, min(batch, first + per_chunk)) for first in range(0, batch, per_chunk)
    ]
    seen = torch.zeros(batch, positions, dtype=torch.long)
    for chunk in tiles.chunks:
        first_slot = chunk.slots[0]
        for b in range(*chunk.samples):
            slots = tiles.position_slot[b] + first_slot
            assert tiles.slot_valid[slots].all()
            assert torch.equal(tiles.slot_position[slots], torch.arange(positions))
            tile = tiles.position_slot[b] // chunk.size + chunk.tiles[0]
            assert torch.equal(tiles.tile_bucket[tile], b * regions + mask[b])
            assert (tiles.tile_bucket[tile] // regions == b).all()
        valid = tiles.slot_valid[chunk.slots[0]:chunk.slots[1]].view(chunk.tile_count, chunk.size)
        samples = tiles.tile_bucket[chunk.tiles[0]:chunk.tiles[1]] // regions
        for b in range(*chunk.samples):
            seen[b] += valid[samples == b].sum()
    assert (seen == positions).all()  # no slot counted twice


def test_tiling_pads_little_when_regions_are_even_and_splits_a_dominant_region():
    batch, regions, positions = 4, 8, 800
    even = fast.tile_positions(torch.arange(positions).repeat(batch, 1) % regions, regions, batch)
    assert not even.chunks[0].split
    assert even.chunks[0].size == fast._round_up(positions // regions, fast._TILE_ALIGN)
    dominant = torch.zeros(batch, positions, dtype=torch.long)
    dominant[:, :8] = torch.arange(8)
    split = fast.tile_positions(dominant, regions, batch)
    assert split.chunks[0].split
    # a single bucket per sample would need 8 tiles of 793 slots; split tiles need ~1 per 100 positions
    assert split.slot_position.numel() < 2 * batch * positions


def test_the_compiled_kernels_are_the_default_on_cpu_where_they_build_else_fast():
    expected = "compiled" if region_conv_cpu.available() else "fast"
    (x, guide, filters), conv_args = make_inputs(CASES[0])
    out = region_conv2d(x.requires_grad_(), guide, filters, *conv_args)
    assert type(out.grad_fn).__name__ == f"RegionConv2d{expected.capitalize()}Backward"
    torch.testing.assert_close(out, region_conv2d(x, guide, filters, *conv_args, impl="reference"))
    assert default_region_conv_impl("cpu") == expected


def test_cuda_prefers_the_triton_kernel_where_triton_is_installed():
    expected = "triton" if "triton" in region_conv_impls("cuda") else "fast"
    assert default_region_conv_impl("cuda") == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_matches_reference(case):
    """The fast implementation's torch ops on CUDA tensors (float64, against the reference on CUDA too)."""
    tensors, conv_args = make_inputs(case)
    assert_matches_reference([t.cuda() for t in tensors], conv_args, rtol=1e-10, atol=1e-10)
