"""region_conv2d (the paper's Eq. 3-8) against an independent, deliberately simple reference."""

import pytest
import torch
import torch.nn.functional as F

import drbench.ops.region_conv_triton
from drbench.ops.functional import region_conv2d, region_conv_impls


def simple_region_conv(x, guide, filters, stride, padding, dilation):
    """Unfold + einsum: every region's output at every position, then the argmax region's, via a one-hot mask.

    The guide's gradient is the paper's softmax substitute (Fig. 2a): the forward value is the hard selection, but
    gradients flow as if the output were sum_j softmax(guide)_j * y_j with the y_j held constant.
    """
    batch, regions, out_channels, _, kh, kw = filters.shape
    out_h, out_w = guide.shape[-2:]
    patches = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C*kh*kw, L)
    every = torch.einsum("bkl,bmok->bmol", patches, filters.flatten(3))  # (B, m, O, L)
    one_hot = F.one_hot(guide.flatten(2).argmax(1), regions).permute(0, 2, 1).unsqueeze(2).to(x.dtype)
    hard = (one_hot * every).sum(1)
    soft = torch.softmax(guide.flatten(2), dim=1).unsqueeze(2)
    soft_surrogate = (soft * every.detach()).sum(1)
    out = hard + soft_surrogate - soft_surrogate.detach()  # value of hard, guide gradient of the surrogate
    return out.view(batch, out_channels, out_h, out_w)


CASES = [
    # (C, O, H, W, k, stride, padding, dilation, m)
    (5, 4, 7, 6, 1, 1, 0, 1, 1),
    (5, 4, 7, 6, 1, 1, 0, 1, 8),
    (3, 6, 8, 8, 3, 1, 1, 1, 8),
    (3, 6, 9, 8, 3, 2, 1, 1, 4),
    (4, 3, 9, 9, 3, 1, 2, 2, 8),
    (4, 3, 10, 9, 1, 2, 0, 1, 8),
    (2, 5, 8, 7, 3, 1, 0, 1, 1),
]


def make_inputs(case, dtype=torch.float64, batch=2, seed=0):
    channels, out_channels, height, width, k, stride, padding, dilation, regions = case
    gen = torch.Generator().manual_seed(seed)
    out_h = (height + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    x = torch.randn(batch, channels, height, width, generator=gen, dtype=dtype)
    guide = torch.randn(batch, regions, out_h, out_w, generator=gen, dtype=dtype)
    filters = torch.randn(batch, regions, out_channels, channels, k, k, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (x, guide, filters)], (stride, padding, dilation)


@pytest.mark.parametrize("impl", region_conv_impls("cpu"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "C{}O{}_{}x{}_k{}_s{}_p{}_d{}_m{}".format(*c))
def test_output_and_all_gradients_match_simple_reference(case, impl):
    (x, guide, filters), conv_args = make_inputs(case)
    out = region_conv2d(x, guide, filters, *conv_args, impl=impl)
    expected = simple_region_conv(x, guide, filters, *conv_args)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, guide, filters), grad_out)
    expected_grads = torch.autograd.grad(expected, (x, guide, filters), grad_out)
    for name, got, want in zip(("x", "guide", "filters"), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


def test_guide_gradient_is_eq_6_to_8_written_out():
    """g_j = sum_o grad_y * y_j (Eq. 7); grad_F = s * (g - <s, g>) (Eq. 8), computed by hand for one position."""
    (x, guide, filters), conv_args = make_inputs((3, 4, 5, 5, 1, 1, 0, 1, 4), batch=1)
    out = region_conv2d(x, guide, filters, *conv_args)
    grad_out = torch.randn_like(out)
    (grad_guide,) = torch.autograd.grad(out, guide, grad_out)
    u, v = 2, 3
    w = filters[0, :, :, :, 0, 0]  # (m, O, C)
    y_regions = w @ x[0, :, u, v]  # (m, O): what each region's filter gives at (u, v)
    g = y_regions @ grad_out[0, :, u, v]
    s = torch.softmax(guide[0, :, u, v], dim=0)
    torch.testing.assert_close(grad_guide[0, :, u, v], s * (g - (s * g).sum()))


def test_only_the_selected_filter_receives_gradient():
    (x, guide, filters), conv_args = make_inputs((3, 4, 5, 5, 1, 1, 0, 1, 4), batch=1)
    with torch.no_grad():
        guide.zero_()
        guide[:, 2] = 1.0  # every position selects region 2
    out = region_conv2d(x, guide, filters, *conv_args)
    (grad_filters,) = torch.autograd.grad(out.sum(), filters)
    assert grad_filters[:, 2].abs().sum() > 0
    assert torch.count_nonzero(grad_filters[:, [0, 1, 3]]) == 0


@pytest.mark.parametrize("impl", region_conv_impls("cpu"))
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]])
def test_gradcheck_exact_parts(case, impl):
    """x and filters have exact gradients; the guide is held fixed (its gradient is Eq. 6-8's approximation)."""
    (x, guide, filters), conv_args = make_inputs(case, batch=1)
    guide = guide.detach()

    def fn(x_, filters_):
        return region_conv2d(x_, guide, filters_, *conv_args, impl=impl)

    assert torch.autograd.gradcheck(fn, (x, filters), eps=1e-6, atol=1e-6)


def test_float32_matches_float64():
    (x, guide, filters), conv_args = make_inputs(CASES[3])
    out64 = region_conv2d(x, guide, filters, *conv_args)
    out32 = region_conv2d(x.float(), guide.float(), filters.float(), *conv_args)
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((2, 3, 8, 8), (2, 4, 8, 8), (2, 4, 5, 3)), "filters must be"),
        (((2, 3, 8, 8), (2, 4, 8, 8), (3, 4, 5, 3, 1, 1)), "filters"),
        (((2, 3, 8, 8), (2, 4, 8, 8), (2, 4, 5, 2, 1, 1)), "C=3"),
        (((2, 3, 8, 8), (2, 3, 8, 8), (2, 4, 5, 3, 1, 1)), "guide must be"),
        (((2, 3, 8, 8), (2, 4, 7, 8), (2, 4, 5, 3, 1, 1)), "output resolution"),
        (((3, 8, 8), (2, 4, 8, 8), (2, 4, 5, 3, 1, 1)), "x must be"),
        (((2, 3, 2, 2), (2, 4, 1, 1), (2, 4, 5, 3, 3, 3)), "does not fit"),
    ],
)
def test_mismatched_shapes_are_clear_errors(shapes, message):
    tensors = [torch.randn(*shape) for shape in shapes]
    with pytest.raises(ValueError, match=message):
        region_conv2d(*tensors)


def test_mixed_dtypes_and_unknown_impl_are_errors():
    x, guide, filters = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 3, 2, 1, 1)
    with pytest.raises(TypeError, match="dtype"):
        region_conv2d(x, guide.double(), filters)
    with pytest.raises(ValueError, match="implementation"):
        region_conv2d(x, guide, filters, impl="nope")


def test_implementations_are_listed_in_the_order_functional_imports_them():
    """The reference first, then the faster ones; "triton" only where triton is installed."""
    triton_installed = drbench.ops.region_conv_triton.triton is not None
    assert region_conv_impls() == ["reference", "fast", *(["triton"] if triton_installed else []), "compiled"]
