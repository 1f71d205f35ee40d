"""DRConv's guide_scope="unit": one guide per model unit, shared by the unit's DRConv layers, as the authors'
ShuffleNetV2 (one ``masknet`` per block for ``conva_right`` and ``convc_right``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from drbench.measure.complexity import complexity
from drbench.models import create_model
from drbench.ops import DRConv2d, create_conv
from drbench.ops.drconv import SharedGuide
from drbench.suite import load_suite

SMALL = dict(width=0.5, op="drconv", regions=4, num_classes=10, input_size=32, small_input=True)


def shufflenet(guide_scope: str = "layer"):
    torch.manual_seed(0)
    return create_model("shufflenetv2", placement="right_branch", guide_scope=guide_scope, **SMALL)


def drconv_layers(module) -> list[DRConv2d]:
    return [m for m in module.modules() if isinstance(m, DRConv2d)]


def test_each_unit_has_one_guide_that_its_two_layers_read_at_their_own_resolution():
    model = shufflenet("unit").eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    units = [unit for stage in (model.stage2, model.stage3, model.stage4) for unit in stage]
    for unit in units:
        first, second = drconv_layers(unit.right)
        assert first.shared_guide is unit.guide is second.shared_guide and first.guide is None
        expected = first.last_mask
        if unit.stride > 1:  # the depthwise conv between them halved the map: the authors' nearest resizing
            expected = F.interpolate(expected[:, None].float(), second.last_mask.shape[-2:])[:, 0].long()
        assert torch.equal(second.last_mask, expected)


def test_a_layer_reading_the_units_guide_computes_what_a_layer_with_that_guide_of_its_own_does():
    torch.manual_seed(0)
    shared = SharedGuide(8, regions=4).double()
    layer = DRConv2d(8, 16, 1, regions=4, shared_guide=shared, impl="reference").double()
    twin = DRConv2d(8, 16, 1, regions=4, impl="reference").double()
    twin.load_state_dict({name.replace("shared_guide.", ""): value for name, value in layer.state_dict().items()})
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with shared.over(x):
        out = layer(x)
    expected = twin(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(shared.guide.weight.grad, twin.guide.weight.grad)
    torch.testing.assert_close(layer.generator.weight.grad, twin.generator.weight.grad)


def test_the_units_guide_is_counted_once_in_parameters_and_macs():
    own, shared = complexity(shufflenet("layer"), 32), complexity(shufflenet("unit"), 32)
    layers = drconv_layers(shufflenet("layer"))
    guide_params = sum(layer.guide.weight.numel() for layer in layers)
    unit_guides = [unit.guide for stage in (shufflenet("unit").stage2,) for unit in stage]
    assert all(guide is not None for guide in unit_guides)
    # each unit's guide sees the unit's input (as many channels as its first layer's), so one guide replaces two
    assert shared.params == own.params - guide_params // 2
    assert shared.macs < own.macs


def test_a_stored_model_with_shared_guides_loads_back():
    model = shufflenet("unit")
    rebuilt = shufflenet("unit")
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), rebuilt.eval()(x))


@pytest.mark.parametrize("model, placement", [("shufflenetv2", "default"), ("mobilenetv1", "default")])
def test_a_unit_guide_where_no_unit_builds_the_layer_is_refused_naming_the_conv(model, placement):
    with pytest.raises(ValueError, match=r"conv #\d+ .*guide_scope='unit'.*not in such a unit"):
        create_model(model, placement=placement, guide_scope="unit",
                     **{**SMALL, "width": 0.5 if model == "shufflenetv2" else 0.25})


def test_a_layer_on_its_own_keeps_its_guide_unknown_scopes_are_refused_and_a_suite_takes_the_option(tmp_path):
    alone = create_conv("drconv", 8, 8, 1, guide_scope="unit")  # what a suite's option check builds: no unit
    assert alone.guide is not None and alone.shared_guide is None
    with pytest.raises(ValueError, match="guide_scope must be one of"):
        create_conv("drconv", 8, 8, 1, guide_scope="block")
    layer = DRConv2d(8, 8, 1, regions=4, shared_guide=SharedGuide(8, regions=4))
    with pytest.raises(RuntimeError, match="outside the unit's forward"):
        layer(torch.randn(1, 8, 4, 4))
    suite = tmp_path / "unit.yaml"
    suite.write_text("name: unit\nfixed: {model: shufflenetv2, width: 0.5, op: drconv, regions: 4, guide_scope: unit,"
                     " placement: right_branch, input_size: 32, small_input: true, num_classes: 10}\n"
                     "metrics: {params: {}}\n")
    (cell,) = load_suite(suite).cells
    assert cell.config()["guide_scope"] == "unit"


def test_mobilenetv2_blocks_share_one_guide_between_expand_and_project():
    torch.manual_seed(0)
    model = create_model("mobilenetv2", guide_scope="unit", **SMALL)
    block = model.stage2[0]
    expand, project = drconv_layers(block)
    assert expand.shared_guide is block.guide is project.shared_guide
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert block.guide.guide.weight.grad.abs().sum() > 0
