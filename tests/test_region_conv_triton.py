"""The Triton region_conv2d ("triton") against the reference: outputs, all three gradients, and its tiling.

With CUDA the kernel is compiled and the tensors live on the GPU; without, it runs in Triton's interpreter on CPU
tensors (slow: the shapes are small).
"""

import pytest
import torch

pytest.importorskip("triton")

import drbench.ops.region_conv_triton as triton_impl  # noqa: E402
from drbench.ops.functional import region_conv2d, region_conv_impls  # noqa: E402
from drbench.ops.region_conv_fast import region_argmax  # noqa: E402
from test_region_conv_fast import CASE_IDS, CASES, assert_matches_reference, make_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def interpreter_without_cuda(monkeypatch):
    """Without CUDA, run the kernel in Triton's interpreter. The implementation reads TRITON_INTERPRET at each
    launch, so setting it here works even when another test module imported triton first."""
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def ieee_float32(monkeypatch):
    """cuDNN's convolutions (the reference's) and the kernel's dot products in full float32, not TF32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def device_inputs(case, dtype=torch.float64, batch=3, guide_bias=None):
    tensors, conv_args = make_inputs(case, dtype=dtype, batch=batch, guide_bias=guide_bias)
    return [t.to(DEVICE) for t in tensors], conv_args


def assert_triton_matches_reference(tensors, conv_args, rtol=1e-10, atol=1e-10):
    assert_matches_reference(tensors, conv_args, rtol=rtol, atol=atol, impl="triton")


# (C, O, H, W, k, stride, padding, dilation, m): more output channels than one BLOCK_O, interpreted or compiled
WIDE = (5, 70, 6, 5, 3, 1, 1, 1, 3)


@pytest.mark.parametrize("case", CASES + [WIDE], ids=CASE_IDS + ["wide"])
def test_float64_matches_reference_tightly(case):
    assert_triton_matches_reference(*device_inputs(case))


@pytest.mark.parametrize("case", CASES[1::2], ids=CASE_IDS[1::2])
def test_float32_matches_reference(case, ieee_float32):
    assert_triton_matches_reference(*device_inputs(case, dtype=torch.float32), rtol=1e-4, atol=1e-4)


def test_float32_follows_cudnn_tf32_setting(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert triton_impl.dot_precision(torch.float32) == "tf32"
    assert triton_impl.dot_precision(torch.float64) == "ieee"
    # TF32 keeps 10 bits of mantissa: about 1e-3 relative per product (nothing in the interpreter)
    assert_triton_matches_reference(*device_inputs(CASES[4], dtype=torch.float32), rtol=2e-2, atol=2e-2)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert triton_impl.dot_precision(torch.float32) == "ieee"


@pytest.mark.parametrize("case", [CASES[2], CASES[5]], ids=[CASE_IDS[2], CASE_IDS[5]])
def test_uneven_and_empty_regions(case):
    regions = case[-1]
    dominant = [4.0] + [0.0] * (regions - 1)  # region 0 takes most positions: several tiles of its bucket
    assert_triton_matches_reference(*device_inputs(case, guide_bias=dominant))
    never = [0.0] * (regions - 2) + [-50.0, -50.0]  # the last two regions are selected nowhere
    assert_triton_matches_reference(*device_inputs(case, guide_bias=never))


@pytest.mark.parametrize("case", [(3, 4, 10, 10, 3, 1, 1, 1, 1), (2, 3, 8, 8, 1, 1, 0, 1, 8)], ids=["m1", "m8"])
def test_buckets_of_several_tiles(case):
    """One region everywhere: each sample's bucket spans several tiles, the others are empty."""
    regions = case[-1]
    (x, guide, filters), conv_args = device_inputs(case, batch=2, guide_bias=[50.0] + [0.0] * (regions - 1))
    positions = guide.shape[-2] * guide.shape[-1]
    counts, _ = triton_impl.bucket_positions(region_argmax(guide), regions)
    assert (counts[:, 0] == positions).all() and positions > triton_impl.block_positions(positions, regions)
    assert_triton_matches_reference((x, guide, filters), conv_args)


@pytest.mark.parametrize("bias", [None, [3.0, 0, 0, 0, 0], [0, 0, 0, -60.0, -60.0]], ids=["even", "dominant", "empty"])
def test_bucketing_groups_each_samples_positions_by_region(bias):
    batch, regions, positions = 3, 5, 1500  # more positions than one program of the bucketing kernels takes
    guide = torch.randn(batch, regions, positions, 1, generator=torch.Generator().manual_seed(3))
    if bias is not None:
        guide = guide + torch.tensor(bias).view(1, regions, 1, 1)
    mask = region_argmax(guide.to(DEVICE))
    counts, sorted_position = (t.long().cpu() for t in triton_impl.bucket_positions(mask, regions))
    mask = mask.cpu()
    assert torch.equal(counts, torch.stack([torch.bincount(row, minlength=regions) for row in mask]))
    assert torch.equal(sorted_position.sort(dim=1).values, torch.arange(positions).expand(batch, -1))
    assert torch.equal(mask.gather(1, sorted_position), mask.sort(dim=1).values)  # grouped in region order


def test_non_contiguous_inputs():
    (x, guide, filters), conv_args = device_inputs(CASES[5])
    x_channels_last = x.contiguous(memory_format=torch.channels_last)
    guide_transposed = guide.transpose(2, 3).contiguous().transpose(2, 3)
    filters_region_major = filters.transpose(0, 1).contiguous().transpose(0, 1)
    assert_triton_matches_reference((x_channels_last, guide_transposed, filters_region_major), conv_args)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in region_conv_impls("cpu")
    (x, guide, filters), conv_args = make_inputs(CASES[0])
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        region_conv2d(x, guide, filters, *conv_args, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in region_conv_impls("cpu")


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is a CUDA notion")
def test_forward_does_not_synchronise_with_the_host(ieee_float32):
    (x, guide, filters), conv_args = device_inputs(CASES[4], dtype=torch.float32)
    region_conv2d(x, guide, filters, *conv_args, impl="triton")  # the autotuner's first call times configs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        region_conv2d(x, guide, filters, *conv_args, impl="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
