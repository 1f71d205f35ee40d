"""The operator modules: properties that tie each to a standard convolution, training, and bad arguments."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from drbench.ops import CondConv2d, DRConv2d, LocalConv2d, create_conv, get_op, list_ops


def test_registry_lists_the_four_operators():
    assert list_ops()[:4] == ["conv", "drconv", "condconv", "local"]
    assert isinstance(create_conv("conv", 3, 4, 3), nn.Conv2d)
    assert get_op("local").needs_input_size


def test_drconv_with_one_region_is_a_convolution_with_its_generated_filter():
    torch.manual_seed(0)
    layer = DRConv2d(6, 5, 3, stride=2, padding=1, regions=1).double()
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    filters = layer.generator(x)  # (B, 1, O, C, k, k)
    expected = torch.stack(
        [F.conv2d(x[b : b + 1], filters[b, 0], layer.bias, stride=2, padding=1)[0] for b in range(3)]
    )
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kernel, hidden", [(1, 4), (3, 4), (3, 8)])
def test_dynamic_generator_is_the_papers_pool_conv_sigmoid_grouped_conv(kernel, hidden):
    torch.manual_seed(0)
    layer = DRConv2d(5, 6, kernel, padding=kernel // 2, regions=4, hidden_channels=hidden, init="independent").double()
    generator = layer.generator
    x = torch.randn(3, 5, 9, 9, dtype=torch.float64)
    hidden_units = torch.sigmoid(generator.hidden(F.adaptive_avg_pool2d(x, kernel)))
    per_region = hidden // 4
    # the (m, per_region, O*C) kernel as nn.Conv2d's (m*O*C, per_region, 1, 1) one, groups = m
    weight = generator.weight.transpose(1, 2).reshape(-1, per_region, 1, 1)
    expected = F.conv2d(hidden_units, weight, generator.bias.reshape(-1), groups=4)
    torch.testing.assert_close(generator(x), expected.view(3, 4, 6, 5, kernel, kernel))


@pytest.mark.parametrize("groups", [1, 2])
def test_local_conv_with_one_filter_everywhere_equals_conv2d(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=groups).double()
    local = LocalConv2d(4, 6, 3, stride=2, padding=1, groups=groups, input_size=(9, 7)).double()
    with torch.no_grad():
        per_group = conv.weight.view(groups, 6 // groups, -1).transpose(1, 2)  # (G, C/G*k*k, O/G)
        local.weight.copy_(per_group.expand_as(local.weight))
        local.bias.copy_(conv.bias.view(-1, 1, 1).expand_as(local.bias))
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(local(x), conv(x))


@pytest.mark.parametrize("groups", [1, 4])
def test_condconv_with_one_expert_is_a_convolution_scaled_by_its_routing_weight(groups):
    torch.manual_seed(0)
    layer = CondConv2d(4, 8, 3, padding=1, groups=groups, bias=False, experts=1).double()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    routing = layer.routing_weights(x)  # (B, 1)
    expected = routing[:, :, None, None] * F.conv2d(x, layer.weight[0], padding=1, groups=groups)
    torch.testing.assert_close(layer(x), expected)


def test_guided_mask_is_translation_equivariant_away_from_borders():
    torch.manual_seed(0)
    layer = DRConv2d(3, 4, 3, padding=1, regions=8, init="independent").double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    shift = 3
    layer(x)
    mask = layer.last_mask
    layer(torch.roll(x, shifts=shift, dims=-1))
    shifted_mask = layer.last_mask
    interior = slice(2, -2)
    assert torch.equal(shifted_mask[:, interior, 2 + shift : -2], mask[:, interior, 2 : -2 - shift])


@pytest.mark.parametrize(
    "op, options",
    [
        ("conv", {}),
        ("drconv", {"regions": 4}),
        ("drconv", {"regions": 4, "generator": "static"}),
        ("drconv", {"regions": 4, "generator": "mixture", "bases": 3}),
        ("condconv", {"experts": 4}),
        ("local", {"input_size": (8, 8)}),
    ],
)
def test_each_operator_trains_and_every_parameter_gets_a_gradient(op, options):
    torch.manual_seed(0)
    model = nn.Sequential(create_conv(op, 3, 8, 3, padding=1, **options), nn.ReLU(), nn.Conv2d(8, 2, 1))
    x = torch.randn(16, 3, 8, 8)
    target = torch.randn(16, 2, 8, 8)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        optimiser.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        if step == 0:
            missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, f"no gradient for {missing}"
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_guided_mask_learns():
    """The guide conv's weights move under the Eq. 6-8 gradient (argmax alone would give them none)."""
    torch.manual_seed(0)
    layer = DRConv2d(3, 4, 1, regions=4)
    before = layer.guide.weight.detach().clone()
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.1)
    loss = layer(torch.randn(4, 3, 6, 6)).pow(2).mean()
    loss.backward()
    optimiser.step()
    assert not torch.equal(before, layer.guide.weight)


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: DRConv2d(4, 4, 1, regions=0), ValueError, "regions must be >= 1"),
        (lambda: DRConv2d(4, 4, 1, groups=2), ValueError, "groups=1 only"),
        (lambda: DRConv2d(4, 4, 1, generator="magic"), ValueError, "generator must be one of"),
        (lambda: DRConv2d(4, 4, 1, regions=4, hidden_channels=6), ValueError, "multiple of regions"),
        (lambda: DRConv2d(4, 4, 1, impl="nope"), ValueError, "impl must be one of"),
        (lambda: CondConv2d(4, 4, 1, experts=0), ValueError, "experts must be >= 1"),
        (lambda: CondConv2d(4, 6, 1, groups=4), ValueError, "divisible by"),
        (lambda: LocalConv2d(4, 4, 3), ValueError, "needs input_size"),
        (lambda: create_conv("deformable", 4, 4, 3), ValueError, "conv, drconv, local"),
        (lambda: create_conv("local", 4, 4, 3), ValueError, "needs input_size"),
        (lambda: create_conv("conv", 4, 4, 3, regions=8), TypeError, "does not take regions"),
    ],
)
def test_bad_arguments_say_what_was_expected(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_local_conv_rejects_an_input_of_another_size():
    layer = LocalConv2d(2, 2, 3, padding=1, input_size=(8, 8))
    with pytest.raises(ValueError, match=r"built for input size \(8, 8\), got \(9, 8\)"):
        layer(torch.randn(1, 2, 9, 8))


def test_create_conv_passes_input_size_only_where_needed():
    assert isinstance(create_conv("conv", 2, 2, 1, input_size=(5, 5)), nn.Conv2d)
    assert create_conv("local", 2, 2, 1, input_size=(5, 5)).output_size == (5, 5)
