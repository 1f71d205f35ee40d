"""The model zoo: torchvision-equal architectures, operator placement, size tracking, replace_convs."""

import pytest
import torch
import torch.nn as nn

from drbench.measure.timing import fixed_threads
from drbench.models import create_model, list_models, make_divisible, replace_convs
from drbench.ops import CondConv2d, DRConv2d, LocalConv2d


SMALLEST_WIDTH = {"shufflenetv2": 0.5, "mobilenetv2": 0.25, "mobilenetv1": 0.25, "mobilefacenet": 1.0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small forward passes gain nothing from threads; on a shared 2-core machine, threads contend."""
    with fixed_threads(1):
        yield


def count_params(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def count_modules(model: nn.Module, kind: type) -> int:
    return sum(isinstance(module, kind) for module in model.modules())


def test_families_are_registered_in_order():
    assert list_models() == ["shufflenetv2", "mobilenetv2", "mobilenetv1", "mobilefacenet"]


@pytest.mark.parametrize(
    "name, width, expected",
    [
        # torchvision.models.shufflenet_v2_x{0_5,1_0,1_5,2_0}(): sum of parameter sizes, 1000 classes
        ("shufflenetv2", 0.5, 1_366_792),
        ("shufflenetv2", 1.0, 2_278_604),
        ("shufflenetv2", 1.5, 3_503_624),
        ("shufflenetv2", 2.0, 7_393_996),
        # torchvision.models.mobilenet_v2()
        ("mobilenetv2", 1.0, 3_504_872),
    ],
)
def test_parameter_counts_equal_torchvision(name, width, expected):
    assert count_params(create_model(name, width=width)) == expected


@pytest.mark.parametrize(
    "name, width, input_size, published",
    [
        # TF-slim mobilenet_v1.md: 1.0 -> 4.24M, 0.5 -> 1.34M, 0.25 -> 0.47M parameters
        ("mobilenetv1", 1.0, 224, 4.24e6),
        ("mobilenetv1", 0.5, 224, 1.34e6),
        ("mobilenetv1", 0.25, 224, 0.47e6),
        # MobileNetV2 paper / TF-slim README: 0.35 -> 1.66M (1.7M), 1.4 -> 6.06M (6.9M in the paper's table)
        ("mobilenetv2", 0.35, 224, 1.66e6),
        ("mobilenetv2", 1.4, 224, 6.06e6),
        # MobileFaceNet paper (arXiv 1804.07573): about 0.99M parameters
        ("mobilefacenet", 1.0, 112, 0.99e6),
    ],
)
def test_parameter_counts_near_published(name, width, input_size, published):
    assert count_params(create_model(name, width=width, input_size=input_size)) == pytest.approx(published, rel=0.015)


def test_make_divisible_is_mobilenets_rounding():
    assert make_divisible(32 * 0.35) == 16  # 8 would be more than 10% below 11.2
    assert make_divisible(24 * 0.75) == 24
    assert make_divisible(1280 * 1.4) == 1792
    assert make_divisible(3) == 8  # never below the divisor
    assert make_divisible(100) == 104


@pytest.mark.parametrize("name", ["shufflenetv2", "mobilenetv2", "mobilenetv1", "mobilefacenet"])
def test_small_input_stem_keeps_a_4x4_final_map_for_32x32_images(name):
    model = create_model(name, width=SMALLEST_WIDTH[name], op="local", placement="all", num_classes=10,
                         input_size=32, small_input=True)
    # LocalConv2d raises on any input size other than the one it was built for: the forward pass proves that
    # the builder tracked every layer's size, branches and strides included.
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    last_local = [module for module in model.modules() if isinstance(module, LocalConv2d)][-1]
    assert min(last_local.input_size) <= 4


@pytest.mark.parametrize("name, input_size", [("shufflenetv2", 64), ("mobilenetv2", 64), ("mobilefacenet", (112, 96))])
def test_local_conv_is_built_for_each_layers_spatial_size(name, input_size):
    placement = "last3" if name == "mobilefacenet" else "default"
    model = create_model(name, width=SMALLEST_WIDTH[name], op="local", placement=placement, input_size=input_size,
                         num_classes=7).eval()
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    assert model(torch.randn(1, 3, *size)).shape == (1, 7)


@pytest.mark.parametrize(
    "name, placement, op_type, expected",
    [
        # 3 stride-2 units x (left 1x1 + two right 1x1) + 13 stride-1 units x two right 1x1
        ("shufflenetv2", "default", DRConv2d, 3 * 3 + 13 * 2),
        ("shufflenetv2", "right_branch", DRConv2d, 16 * 2),
        ("shufflenetv2", "pointwise", DRConv2d, 3 * 3 + 13 * 2 + 1),  # + conv5
        # 17 blocks, the first without an expand conv; the last 1x1 conv (to 1280) is the head
        ("mobilenetv2", "default", DRConv2d, 17 * 2 - 1),
        ("mobilenetv2", "pointwise", DRConv2d, 17 * 2),
        ("mobilenetv2", "all", CondConv2d, 1 + 17 * 3 - 1 + 1),  # stem, blocks, head
        ("mobilenetv1", "default", DRConv2d, 13),
        ("mobilenetv1", "all", CondConv2d, 27),
        # 15 bottlenecks x (expand + project)
        ("mobilefacenet", "default", DRConv2d, 15 * 2),
        ("mobilefacenet", "last3", LocalConv2d, 3),
    ],
)
def test_placement_selects_the_documented_convolutions(name, placement, op_type, expected):
    op = {DRConv2d: "drconv", CondConv2d: "condconv", LocalConv2d: "local"}[op_type]
    model = create_model(name, width=SMALLEST_WIDTH[name], op=op, placement=placement, input_size=16,
                         small_input=True, num_classes=10)
    assert count_modules(model, op_type) == expected


def test_default_placement_keeps_stem_and_head_standard():
    model = create_model("shufflenetv2", width=0.5, op="condconv", input_size=32, small_input=True)
    assert type(model.conv1[0]) is nn.Conv2d
    assert type(model.conv5[0]) is nn.Conv2d
    assert isinstance(model.stage2[0].left[1][0], CondConv2d)
    assert type(model.stage2[0].left[0][0]) is nn.Conv2d  # depthwise stays standard


def test_op_options_reach_every_replaced_operator():
    model = create_model("mobilenetv1", width=0.25, op="drconv", regions=4, generator="static", input_size=32)
    layers = [module for module in model.modules() if isinstance(module, DRConv2d)]
    assert {(layer.regions, layer.generator_name) for layer in layers} == {(4, "static")}


def test_drconv_on_depthwise_convolutions_is_a_clear_error():
    with pytest.raises(ValueError, match=r"placement 'all'.*depthwise.*groups=1 only"):
        create_model("mobilenetv2", op="drconv", placement="all", input_size=32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "resnet50"}, r"unknown model 'resnet50'; expected one of: shufflenetv2, mobilenetv2"),
        ({"name": "shufflenetv2", "width": 0.75}, r"no width 0.75; expected 0.5, 1.0, 1.5, 2.0"),
        ({"name": "mobilenetv2", "width": 2.0}, r"no width 2.0; expected any width in \[0.25, 1.4\]"),
        ({"name": "mobilenetv1", "placement": "right_branch"}, r"no placement 'right_branch'; expected one of"),
        ({"name": "mobilenetv1", "op": "deformable"}, r"unknown operator 'deformable'"),
        ({"name": "mobilenetv1", "input_size": (1, 32, 32)}, r"input_size must be an int or \(H, W\)"),
        ({"name": "mobilenetv1", "num_classes": 0}, r"num_classes must be >= 1"),
        ({"name": "mobilenetv1", "op": "condconv", "regions": 8}, r"'condconv' does not take regions"),
    ],
)
def test_bad_arguments_name_what_was_expected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(**kwargs)


def test_any_mobilenetv2_width_in_range_builds():
    model = create_model("mobilenetv2", width=0.6, input_size=16, small_input=True, num_classes=3)
    assert model.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 3)


def test_mobilefacenet_outputs_a_128d_embedding_by_default():
    model = create_model("mobilefacenet", input_size=(112, 96)).eval()
    assert model(torch.randn(1, 3, 112, 96)).shape == (1, 128)
    assert model.gdconv[0].kernel_size == (7, 6)  # the global depthwise conv covers the whole final map


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding="same"),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),
        nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU()),
    )


def test_replace_convs_copies_the_convolution_geometry():
    net = replace_convs(small_net(), "condconv", where="all", experts=2)
    first, depthwise, pointwise = net[0], net[3], net[4][0]
    assert all(isinstance(layer, CondConv2d) for layer in (first, depthwise, pointwise))
    assert (first.padding, depthwise.stride, depthwise.groups) == ((1, 1), (2, 2), 8)
    assert depthwise.bias is None and pointwise.bias is not None and pointwise.experts == 2
    assert net.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 16, 8, 8)


def test_replace_convs_learns_input_sizes_for_local_convolution():
    net = replace_convs(small_net(), "local", where="all", input_size=16)
    assert [layer.input_size for layer in (net[0], net[3], net[4][0])] == [(16, 16), (16, 16), (8, 8)]
    assert net.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 16, 8, 8)


def test_replace_convs_selects_by_predicate_and_leaves_operator_internals_alone():
    net = replace_convs(small_net(), "drconv", where="pointwise", regions=4)
    assert isinstance(net[4][0], DRConv2d) and type(net[0]) is nn.Conv2d
    # A second pass with "all" must not reach into the DRConv's own guide and generator convolutions.
    replace_convs(net, "condconv", where=lambda site: site.name == "0", experts=2)
    assert isinstance(net[0], CondConv2d) and type(net[4][0].guide) is nn.Conv2d
    before = count_modules(net, nn.Conv2d)
    replace_convs(net, "condconv", where="all")
    assert count_modules(net, nn.Conv2d) == before - 1  # only the depthwise conv was the model's own


def test_replace_convs_errors():
    with pytest.raises(ValueError, match="needs input_size"):
        replace_convs(small_net(), "local", where="all")
    with pytest.raises(ValueError, match="where must be a predicate or one of: all, pointwise"):
        replace_convs(small_net(), "condconv", where="depthwise-only")
    with pytest.raises(ValueError, match=r"cannot put 'drconv' on 3: 3x3 depthwise conv 8->8"):
        replace_convs(small_net(), "drconv", where="all")


@pytest.mark.parametrize("op, options", [("drconv", {"regions": 4}), ("condconv", {"experts": 4})])
def test_gradients_reach_every_parameter_of_a_built_model(op, options):
    torch.manual_seed(0)
    model = create_model("mobilenetv1", width=0.25, op=op, num_classes=5, input_size=16, small_input=True,
                         **options)
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    nn.functional.cross_entropy(model(images), labels).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
