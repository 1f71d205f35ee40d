"""Complexity counting: the published MACs and parameters of each family, the DRConv paper's Table 1, and the
rules for drbench's operators.

Published figures (copied here; sources beside each):
- ShuffleNetV2 paper (Ma et al. 2018), Table 5 / torchvision: 0.5x 41M, 1x 146M, 1.5x 299M, 2x 591M MACs.
- MobileNetV2 paper / TF-slim mobilenet README: 1.0 300M, 0.75 209M, 0.5 97M, 0.35 59M MACs; torchvision's
  width 1.0 model has 3,504,872 parameters.
- TF-slim mobilenet_v1.md: 1.0 569M MACs / 4.24M params, 0.5 150M / 1.34M.
- MobileFaceNet paper (arXiv 1804.07573): 221M MACs at 112x112 (189M at 112x96, DRConv paper Table 2), ~0.99M
  params.
- DRConv paper (Chen et al., CVPR 2021) Table 1, ImageNet 224x224, m = 8 regions / 8 experts.
"""

import json
import warnings

import pytest
import torch
import torch.nn as nn

from drbench.measure.complexity import Complexity, complexity
from drbench.measure.timing import fixed_threads
from drbench.models import create_model
from drbench.ops import CondConv2d, DRConv2d, LocalConv2d
from drbench.ops.drconv import drconv_impls


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Counting does not depend on threads; on a shared 2-core machine, threads contend and slow tracing down."""
    with fixed_threads(1):
        yield


def slow(*values):
    """A parameter row that takes several seconds on a 2-core machine: run in CI's slow job."""
    return pytest.param(*values, marks=pytest.mark.slow)


def count(model: nn.Module, input_size, **kwargs) -> Complexity:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no operator of drbench's models may go uncounted
        return complexity(model, input_size, **kwargs)


@pytest.mark.parametrize(
    "name, width, input_size, published_macs, tolerance",
    [
        ("shufflenetv2", 0.5, 224, 41e6, 0.03),
        ("shufflenetv2", 1.0, 224, 146e6, 0.03),
        slow("shufflenetv2", 1.5, 224, 299e6, 0.03),
        slow("shufflenetv2", 2.0, 224, 591e6, 0.03),
        ("mobilenetv2", 1.0, 224, 300e6, 0.03),
        slow("mobilenetv2", 0.75, 224, 209e6, 0.03),
        slow("mobilenetv2", 0.5, 224, 97e6, 0.03),
        ("mobilenetv2", 0.35, 224, 59e6, 0.04),
        slow("mobilenetv1", 1.0, 224, 569e6, 0.03),
        ("mobilenetv1", 0.5, 224, 150e6, 0.03),
        slow("mobilefacenet", 1.0, (112, 112), 221e6, 0.05),
        ("mobilefacenet", 1.0, (112, 96), 189e6, 0.05),
    ],
)
def test_baseline_macs_match_the_published_figures(name, width, input_size, published_macs, tolerance):
    cost = count(create_model(name, width=width, input_size=input_size), input_size)
    assert cost.macs == pytest.approx(published_macs, rel=tolerance)


@pytest.mark.parametrize(
    "name, width, expected_params",
    [
        ("shufflenetv2", 0.5, 1_366_792),
        ("mobilenetv2", 1.0, 3_504_872),
    ],
)
def test_params_are_torchvisions(name, width, expected_params):
    assert count(create_model(name, width=width), 224).params == expected_params


# DRConv paper, Table 1 (m = 8). The issue asks for 15%; drbench's default placement (every 1x1 conv of the
# backbone, the head's last 1x1 excluded), 1x1 guide conv and generator hidden width m land within 5%, and the
# test holds them there so that a drift shows.
@pytest.mark.parametrize(
    "name, width, op, published_macs",
    [
        ("shufflenetv2", 0.5, "drconv", 46e6),
        slow("shufflenetv2", 1.0, "drconv", 157e6),
        slow("mobilenetv2", 1.0, "drconv", 328e6),
        slow("mobilenetv1", 1.0, "drconv", 610e6),
        slow("shufflenetv2", 0.5, "condconv", 43e6),
        slow("shufflenetv2", 1.0, "condconv", 152e6),
        slow("mobilenetv2", 1.0, "condconv", 329e6),
        ("mobilenetv1", 1.0, "condconv", 600e6),
    ],
)
def test_table1_macs_with_the_default_placement(name, width, op, published_macs):
    options = {"regions": 8} if op == "drconv" else {"experts": 8}
    cost = count(create_model(name, width=width, op=op, **options), 224)
    assert cost.macs == pytest.approx(published_macs, rel=0.05)


@pytest.mark.parametrize(
    "op, options, published_macs",
    [
        # DRConv paper, Table 2 (input 112x96): DRConv- 201M, CondConv- 195M, Local-MobileFaceNet 189M
        slow("drconv", {"regions": 8}, 201e6),
        slow("condconv", {"experts": 8}, 195e6),
        ("local", {}, 189e6),
    ],
)
def test_table2_mobilefacenet_macs(op, options, published_macs):
    placement = "last3" if op == "local" else "default"
    model = create_model("mobilefacenet", input_size=(112, 96), op=op, placement=placement, **options)
    assert count(model, (112, 96)).macs == pytest.approx(published_macs, rel=0.05)


@pytest.mark.parametrize("name, width", [("shufflenetv2", 0.5), ("mobilenetv2", 0.35), ("mobilenetv1", 0.25),
                                         ("mobilefacenet", 1.0)])
def test_fvcore_macs_are_half_the_executed_flops_of_plain_convolutional_models(name, width):
    # FlopCounterMode counts conv and linear (addmm) as 2 FLOPs per multiply-add and nothing else here.
    cost = count(create_model(name, width=width, input_size=64), 64)
    assert cost.executed_flops == 2 * cost.macs


def test_the_structured_path_reports_what_its_kernels_execute():
    # Stencils of Q + 1 = 3 terms at every position (K = 3 * C per GEMM column), no filters made.
    batch, c, o, k, m, hidden, out_hw = 2, 6, 5, 3, 4, 8, 8
    layer = DRConv2d(c, o, k, padding=1, regions=m, hidden_channels=hidden, impl="structured")
    cost = count(layer, (c, out_hw, out_hw), batch_size=batch)
    gemms = batch * out_hw**2 * o * (hidden // m + 1) * c
    guide = batch * m * c * k * k * out_hw**2
    assert cost.executed_flops == 2 * (gemms + guide + batch * hidden * c * k * k)


def test_a_pointwise_layer_without_autograd_reports_what_its_fused_kernels_execute():
    # Filters made per (sample, region) from Q + 1 = 3 factors, the guide scored inside the kernel, the generator's
    # hidden conv in one compiled call: each reported, none seen by FlopCounterMode as a torch operator.
    batch, c, o, m, hidden, hw = 2, 6, 5, 4, 8, 8
    layer = DRConv2d(c, o, 1, regions=m, hidden_channels=hidden, impl="structured")
    cost = count(layer, (c, hw, hw), batch_size=batch)
    filters = batch * (hw**2 * o * c + m * (hidden // m + 1) * o * c)
    guide = batch * hw**2 * m * c
    assert cost.executed_flops == 2 * (filters + guide + batch * hidden * c)


def test_drconv_counts_the_selected_filter_conv_guide_and_generator():
    batch, c, o, k, m, hidden, out_hw = 2, 6, 5, 3, 4, 8, 5
    layer = DRConv2d(c, o, k, stride=2, padding=1, regions=m, hidden_channels=hidden, impl="reference")
    cost = count(layer, (c, 9, 9), batch_size=batch)
    selected_conv = batch * o * c * k * k * out_hw**2
    guide = batch * m * c * k * k * out_hw**2
    generator = batch * (hidden * c * k * k + m * o * c * (hidden // m) * k * k)
    assert cost.macs == selected_conv + guide + generator
    # The reference implementation computes every region's output: m times the selected-filter conv.
    assert cost.executed_flops == 2 * (m * selected_conv + guide + generator)


@pytest.mark.parametrize("impl", drconv_impls("cpu"))
def test_every_region_conv_implementation_counts_the_same_algorithmic_cost(impl):
    layer = DRConv2d(6, 5, 3, padding=1, regions=4, hidden_channels=8, impl=impl)
    reference = DRConv2d(6, 5, 3, padding=1, regions=4, hidden_channels=8, impl="reference")
    assert count(layer, (6, 8, 8), batch_size=2).macs == count(reference, (6, 8, 8), batch_size=2).macs


@pytest.mark.parametrize("groups", [1, 3])
def test_condconv_counts_routing_mixing_once_per_sample_and_the_conv(groups):
    batch, c, o, k, experts, out_hw = 3, 6, 9, 3, 4, 7
    layer = CondConv2d(c, o, k, padding=1, groups=groups, experts=experts)
    cost = count(layer, (c, out_hw, out_hw), batch_size=batch)
    routing = batch * c * experts
    mixing = batch * experts * (o * c // groups * k * k + o)  # kernels and biases
    conv = batch * o * c // groups * k * k * out_hw**2
    assert cost.macs == routing + mixing + conv


@pytest.mark.parametrize("groups", [1, 2])
def test_local_conv_counts_as_a_standard_conv(groups):
    local = LocalConv2d(4, 6, 3, stride=2, padding=1, groups=groups, input_size=(10, 10))
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups)
    assert count(local, (4, 10, 10), batch_size=2).macs == count(conv, (4, 10, 10), batch_size=2).macs


def test_batchnorm_activations_and_pooling_are_not_counted():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.PReLU(8),
                          nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    cost = count(model, (3, 16, 16))
    assert cost.macs == 8 * 3 * 9 * 16 * 16 + 8 * 10
    assert cost.unsupported_ops == {}


class Exponential(nn.Module):
    def forward(self, x):
        return torch.exp(x)


def test_unsupported_operators_are_listed_and_warned_not_dropped():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Exponential())
    with pytest.warns(UserWarning, match=r"no counting rule.*aten::exp x1"):
        cost = complexity(model, 8)
    assert cost.unsupported_ops == {"aten::exp": 1}
    assert cost.macs == 4 * 3 * 8 * 8


def test_by_layer_breaks_the_total_down_by_stage():
    model = create_model("shufflenetv2", width=0.5, input_size=64)
    cost = count(model, 64)
    assert [layer.name for layer in cost.by_layer] == ["conv1", "maxpool", "stage2", "stage3", "stage4", "conv5", "fc"]
    assert sum(layer.macs for layer in cost.by_layer) == cost.macs
    assert sum(layer.params for layer in cost.by_layer) == cost.params
    deeper = count(model, 64, depth=2)
    assert "stage2.0" in [layer.name for layer in deeper.by_layer]


def test_batch_scales_macs_and_the_models_mode_is_restored():
    model = create_model("mobilenetv1", width=0.25, input_size=32, small_input=True).train()
    one, four = count(model, 32), count(model, 32, batch_size=4)
    assert four.macs == 4 * one.macs and four.params == one.params
    assert model.training


def test_to_dict_is_json_ready():
    cost = count(create_model("mobilenetv1", width=0.25), (3, 64, 64))
    data = json.loads(json.dumps(cost.to_dict()))
    assert data["macs"] == cost.macs and data["input_size"] == [3, 64, 64]
    assert data["by_layer"][0] == {"name": "stem", "macs": cost.by_layer[0].macs, "params": cost.by_layer[0].params}


@pytest.mark.parametrize("input_size, batch_size", [((3, 0, 8), 1), ((1, 2, 3, 4), 1), (8, 0)])
def test_bad_arguments(input_size, batch_size):
    with pytest.raises(ValueError, match="input_size|batch_size"):
        complexity(nn.Conv2d(3, 3, 1), input_size, batch_size=batch_size)
