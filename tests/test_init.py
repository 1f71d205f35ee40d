"""Initialisation of the dynamic operators, checked against their authors' code (issue 15).

Sources: DRConv, megvii-research/DRConv ``DRConv.py`` (``reset_parameters``: bases He-uniform, routing N(0, 0.01)
with bias 0, coefficients ``2 * sigmoid(routing) / num_W``; the guide ``masknet`` is a conv without bias);
CondConv, timm ``layers/cond_conv2d.py`` and TensorFlow's ``condconv_layers.py`` (every expert initialised as the
convolution it replaces).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from drbench.ops.condconv import CondConv2d
from drbench.ops.drconv import GENERATORS, DRConv2d


def region_spread(layer: DRConv2d, x: torch.Tensor) -> float:
    """The largest relative distance between two regions' generated filters of one sample."""
    with torch.no_grad():
        filters = layer.generator(x).flatten(2)  # (B, m, O*C*k*k)
    distances = torch.cdist(filters, filters)
    return float((distances / filters.norm(dim=2, keepdim=True)).max())


@pytest.mark.parametrize("generator", GENERATORS)
def test_authors_init_starts_every_region_within_a_few_percent_of_the_others(generator):
    torch.manual_seed(0)
    x = torch.randn(4, 32, 9, 9)
    authors = DRConv2d(32, 48, 3, padding=1, regions=8, generator=generator)
    independent = DRConv2d(32, 48, 3, padding=1, regions=8, generator=generator, init="independent")
    assert region_spread(authors, x) < 0.03
    assert region_spread(independent, x) > 0.1


@pytest.mark.parametrize("generator", GENERATORS)
def test_regions_that_start_alike_give_the_guide_almost_no_gradient(generator):
    """With equal filters every region scores alike, so Eq. 7-8 pass (almost) nothing to the guide."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    grads = {}
    for init in ("authors", "independent"):
        layer = DRConv2d(16, 16, 1, regions=8, generator=generator, init=init, impl="reference")
        layer(x).square().sum().backward()
        grads[init] = layer.guide.weight.grad.norm() / layer.guide.weight.norm()
    assert grads["authors"] < 0.05 * grads["independent"]


def test_the_guide_has_no_bias_unless_asked():
    assert DRConv2d(8, 8, 1).guide.bias is None  # the authors' masknet: bias=False
    assert DRConv2d(8, 8, 1, guide_bias=True).guide.bias is not None


@pytest.mark.parametrize("generator, routing", [("dynamic", "hidden"), ("mixture", "routing")])
def test_routing_starts_as_the_authors_at_normal_0_001_and_zero_bias(generator, routing):
    torch.manual_seed(0)
    layer = getattr(DRConv2d(64, 64, 1, regions=8, generator=generator).generator, routing)
    assert layer.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.count_nonzero(layer.bias) == 0


def test_mixture_generator_is_the_authors_mean_of_bases_with_he_uniform_bases():
    torch.manual_seed(0)
    layer = DRConv2d(6, 5, 3, regions=4, generator="mixture", bases=8)
    generator = layer.generator
    bound = math.sqrt(6 / (6 * 3 * 3))
    assert generator.bases.abs().max() <= bound and generator.bases.abs().max() > 0.95 * bound
    x = torch.randn(2, 6, 7, 7)
    coefficients = 2 * torch.sigmoid(generator.routing(x.mean(dim=(2, 3)))) / 8  # DRConv.py's x_se
    expected = coefficients.view(2, 4, 8) @ generator.bases.flatten(1)
    torch.testing.assert_close(generator(x).flatten(2), expected)


@pytest.mark.parametrize("generator", ["dynamic", "static"])
def test_generated_filters_start_with_the_variance_of_the_convolution_they_replace(generator):
    torch.manual_seed(0)
    channels = 256
    layer = DRConv2d(channels, channels, 1, regions=8, generator=generator)
    conv_std = nn.Conv2d(channels, channels, 1).weight.std().item()
    assert layer.generator(torch.randn(2, channels, 4, 4)).std().item() == pytest.approx(conv_std, rel=0.05)


@pytest.mark.parametrize("groups", [1, 8])
def test_condconv_experts_start_exactly_as_convolutions(groups):
    torch.manual_seed(0)
    layer = CondConv2d(64, 64, 3, groups=groups, experts=8)
    conv = nn.Conv2d(64, 64, 3, groups=groups)
    bound = 1 / math.sqrt(64 // groups * 9)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for expert, bias in zip(layer.weight, layer.bias):
        assert expert.abs().max() <= bound and expert.std().item() == pytest.approx(conv.weight.std().item(), rel=0.1)
        assert bias.abs().max() <= bound and bias.abs().max() > 0
    assert not torch.equal(layer.weight[0], layer.weight[1])  # each expert drawn on its own


def test_condconv_scaled_init_keeps_the_mix_at_a_convolutions_variance():
    torch.manual_seed(0)
    layer = CondConv2d(64, 64, 3, experts=8, init="scaled")
    expected = 1 / math.sqrt(3 * 64 * 9) / math.sqrt(0.25 * 8)
    assert layer.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("build, message", [
    (lambda: DRConv2d(4, 4, 1, init="zeros"), "init must be one of"),
    (lambda: CondConv2d(4, 4, 1, init="independent"), "init must be one of"),
])
def test_unknown_inits_are_refused_with_the_choices(build, message):
    with pytest.raises(ValueError, match=message):
        build()
