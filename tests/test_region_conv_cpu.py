"""The compiled CPU region convolution against the reference: DRConv2d's structured path (both ways of computing
the forward, both ways of computing Eq. 7's scores) and the per-sample ``compiled`` implementation, outputs and
every gradient, in float64 tightly and float32 loosely.

The generic ``compiled`` implementation of region_conv2d is also covered by ``test_region_conv.py``, which runs every
registered implementation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from drbench.ops import region_conv_cpu
from drbench.ops.drconv import DRConv2d, default_drconv_impl, drconv_impls
from drbench.ops.functional import region_conv2d

pytestmark = pytest.mark.skipif(not region_conv_cpu.available(), reason="the compiled kernels do not build here")


@dataclass(frozen=True)
class Case:
    batch: int
    channels: int
    out_channels: int
    size: tuple[int, int]
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    regions: int = 4
    hidden: int | None = None  # hidden width of the dynamic generator (default: regions)
    dominant: float = 0.0  # added to region 0's guide bias: large values leave the other regions empty

    def __str__(self) -> str:
        return (f"B{self.batch}-{self.channels}to{self.out_channels}-{self.size[0]}x{self.size[1]}-k{self.kernel}"
                f"-s{self.stride}-p{self.padding}-d{self.dilation}-m{self.regions}-h{self.hidden}-dom{self.dominant}")


CASES = [
    Case(2, 5, 7, (9, 9), 1),
    Case(2, 5, 7, (9, 9), 3, padding=1),
    Case(3, 4, 6, (11, 10), 5, stride=2, padding=2, regions=3),
    Case(2, 3, 5, (10, 10), 3, padding=2, dilation=2, regions=16),
    Case(1, 6, 4, (7, 7), 1, regions=8, hidden=16),  # batch 1, hidden width 2m
    Case(2, 4, 4, (8, 8), 3, stride=2, regions=1),
    Case(2, 6, 5, (8, 9), 3, padding=1, regions=8, hidden=16, dominant=1.5),  # uneven regions
    Case(2, 6, 5, (6, 6), 3, padding=1, regions=5, dominant=1e3),  # every region but one empty
    Case(3, 8, 12, (5, 5), 1, regions=16, dominant=1.0),
]


def make_layer(case: Case, generator: str, dtype: torch.dtype) -> DRConv2d:
    torch.manual_seed(0)
    layer = DRConv2d(case.channels, case.out_channels, case.kernel, case.stride, case.padding, case.dilation,
                     regions=case.regions, generator=generator, hidden_channels=case.hidden, init="independent",
                     guide_bias=True).to(dtype)  # unrelated regions: a routing error shows in every output
    with torch.no_grad():
        layer.guide.bias[0] += case.dominant
        layer.bias.normal_()  # the layer's bias is zero at init: make its gradient path visible
    return layer


def outputs_and_gradients(layer: DRConv2d, x: torch.Tensor, impl: str):
    layer.impl = impl
    layer.zero_grad()
    leaf = x.detach().requires_grad_()
    out = layer(leaf)
    torch.manual_seed(1)
    out.backward(torch.randn_like(out))
    return out.detach(), {"x": leaf.grad, **{name: p.grad.clone() for name, p in layer.named_parameters()
                                             if p.grad is not None}}


def assert_structured_matches_reference(case: Case, generator: str, dtype=torch.float64, rtol=1e-10, atol=1e-10):
    layer = make_layer(case, generator, dtype)
    torch.manual_seed(2)
    x = torch.randn(case.batch, case.channels, *case.size, dtype=dtype)
    out, grads = outputs_and_gradients(layer, x, "structured")
    expected_out, expected = outputs_and_gradients(layer, x, "reference")
    torch.testing.assert_close(out, expected_out, rtol=rtol, atol=atol)
    assert grads.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=rtol, atol=atol, msg=f"gradient of {name}")
    # the generator's hidden conv (through s) and the guide (Eq. 6-8) do get gradients
    assert "guide.weight" in grads and (generator == "static" or "generator.hidden.weight" in grads)


@pytest.fixture(params=["stencils", "filters"])
def forward_way(request, monkeypatch):
    """Each way of computing the forward, whatever the cost rule would choose."""
    monkeypatch.setattr(region_conv_cpu, "stencils_are_cheaper", lambda *args: request.param == "stencils")
    return request.param


@pytest.fixture(params=["factors", "filters"])
def scores_way(request, monkeypatch):
    """Each way of computing Eq. 7's region scores."""
    monkeypatch.setattr(region_conv_cpu, "factored_scores_are_cheaper", lambda *args: request.param == "factors")
    return request.param


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dynamic_generator_matches_reference_in_float64(case, forward_way, scores_way):
    assert_structured_matches_reference(case, "dynamic")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_static_generator_matches_reference_in_float64(case):
    assert_structured_matches_reference(case, "static")


@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_float32_matches_reference_loosely(case, forward_way):
    assert_structured_matches_reference(case, "dynamic", torch.float32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("generator", ["dynamic", "static"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_without_gradients_matches_reference(case, generator, forward_way, monkeypatch):
    # without autograd the forward keeps nothing and goes a block of rows at a time: force one row a block (pointwise
    # layers also score their positions there, with the guide convolution fused)
    monkeypatch.setattr(region_conv_cpu, "_BLOCK_ELEMENTS", 1)
    layer = make_layer(case, generator, torch.float64)
    x = torch.randn(case.batch, case.channels, *case.size, dtype=torch.float64)
    with torch.no_grad():
        out, mask = layer(x), layer.last_mask
        layer.impl = "reference"
        torch.testing.assert_close(out, layer(x), rtol=1e-10, atol=1e-10)
        assert torch.equal(mask, layer.last_mask)


@pytest.mark.parametrize("guide_bias", [False, True])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_pointwise_layers_without_gradients_fuse_the_guide_and_the_generator(guide_bias, dtype, tolerance,
                                                                             monkeypatch):
    from drbench.ops import drconv

    fused = []
    monkeypatch.setattr(drconv, "pointwise_forward",
                        lambda *args: fused.append(1) or region_conv_cpu.pointwise_forward(*args))
    torch.manual_seed(0)
    layer = DRConv2d(12, 10, 1, regions=4, hidden_channels=8, guide_bias=guide_bias, init="independent").to(dtype)
    x = torch.randn(3, 12, 7, 6, dtype=dtype)
    with torch.inference_mode():
        out, mask = layer(x), layer.last_mask
        coeffs, _ = layer.generator.factors(x)
    assert fused == [1]
    expected_coeffs = torch.nn.functional.pad(torch.sigmoid(layer.generator.hidden_units(x)).view(3, 4, 2, 1),
                                              (0, 0, 0, 1), value=1.0)
    torch.testing.assert_close(coeffs, expected_coeffs, rtol=tolerance, atol=tolerance)
    out_with_autograd = layer(x.requires_grad_())  # the unfused path: guide feature, torch generator
    assert fused == [1]
    torch.testing.assert_close(out, out_with_autograd.detach(), rtol=tolerance, atol=tolerance)
    assert torch.equal(mask, layer.last_mask)


def test_the_compiled_implementation_takes_filters_in_any_layout():
    x, guide = torch.randn(2, 5, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    filters = torch.randn(3, 2, 7, 5, 3, 3, dtype=torch.float64).transpose(0, 1)  # region-major, as generated
    for given in (filters, filters.contiguous()):
        torch.testing.assert_close(region_conv2d(x, guide, given, padding=1, impl="compiled"),
                                   region_conv2d(x, guide, given, padding=1, impl="reference"))


def test_drconv_runs_the_structured_path_by_default_on_cpu():
    assert default_drconv_impl("cpu") == "structured" and "structured" in drconv_impls("cpu")
    assert default_drconv_impl("cpu", "mixture") == "compiled"
    layer = DRConv2d(4, 6, 3, padding=1, regions=4)
    out = layer(torch.randn(2, 4, 6, 6, requires_grad=True))
    assert type(out.grad_fn).__name__ == "FactoredRegionConv2dBackward"


def test_the_structured_path_needs_a_factored_generator():
    with pytest.raises(ValueError, match="dynamic or static generator"):
        DRConv2d(4, 4, 1, generator="mixture", impl="structured")


@pytest.mark.parametrize("terms, out_channels, channels, taps, positions, batch, stencils", [
    (2, 64, 64, 9, 784, 16, True),  # 3x3: two GEMM terms against nine taps
    (2, 116, 116, 1, 784, 32, False),  # 1x1 at a batch: a convolution's multiply-adds
    (2, 464, 464, 1, 49, 1, True),  # 1x1, small map, batch 1: a filter too large for the cache, 49 positions
    (2, 232, 232, 1, 49, 1, False),  # the same with a filter that stays in the cache
])
def test_the_cost_rule_chooses_as_documented(terms, out_channels, channels, taps, positions, batch, stencils):
    assert region_conv_cpu.stencils_are_cheaper(terms, out_channels, channels, taps, 8, positions, batch) == stencils


def test_drbench_no_compile_selects_the_pure_torch_path_quietly():
    code = ("import warnings, torch\n"
            "from drbench.ops import region_conv_cpu\n"
            "from drbench.ops.drconv import DRConv2d, default_drconv_impl\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    assert not region_conv_cpu.available() and not region_conv_cpu.available()\n"
            "assert len(caught) == 0, caught\n"  # DRBENCH_NO_COMPILE is a choice, not a failure: no warning
            "assert default_drconv_impl('cpu') == 'fast'\n"
            "print(DRConv2d(4, 4, 1)(torch.randn(1, 4, 5, 5)).shape)\n")
    env = {**os.environ, "DRBENCH_NO_COMPILE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 4, 5, 5])" in result.stdout


def test_a_failed_build_warns_once_and_falls_back(tmp_path):
    code = ("import warnings\n"
            "from drbench.ops import region_conv_cpu\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    assert not region_conv_cpu.available() and not region_conv_cpu.available()\n"
            "assert len(caught) == 1 and 'pure-torch' in str(caught[0].message), caught\n")
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("DRBENCH_NO_COMPILE", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_without_openblas_the_kernels_build_on_torchs_blas_and_match_the_reference(tmp_path):
    # a fresh build (about 40 s) in a process where scipy-openblas32 cannot be imported
    code = ("import sys, torch\n"
            "sys.modules['scipy_openblas32'] = None\n"
            "from drbench.ops import region_conv_cpu\n"
            "from drbench.ops.drconv import DRConv2d\n"
            "assert region_conv_cpu.blas().startswith(\"torch's BLAS\"), region_conv_cpu.blas()\n"
            "layer = DRConv2d(12, 10, 1, regions=4, init='independent').double()\n"
            "x = torch.randn(3, 12, 9, 9, dtype=torch.float64)\n"
            "with torch.no_grad():\n"
            "    out = layer(x)\n"
            "    layer.impl = 'reference'\n"
            "    torch.testing.assert_close(out, layer(x), rtol=1e-10, atol=1e-10)\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("DRBENCH_NO_COMPILE", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_the_kernels_say_which_blas_they_call():
    expected = "OpenBLAS" if region_conv_cpu._openblas() is not None else "torch's BLAS"
    assert region_conv_cpu.blas().startswith(expected)
