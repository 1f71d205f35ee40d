"""Guided-mask rendering (the paper's Fig. 3): collecting DRConv masks, the PNG grid, and ``drbench masks``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from typer.testing import CliRunner

from drbench.checkpoint import Checkpoint
from drbench.cli import app
from drbench.data import Normalization, get_dataset
from drbench.masks import LayerMask, evenly_spaced, guided_masks, region_colours, render_masks
from drbench.measure.accuracy import model_config_for
from drbench.models import create_model
from drbench.ops.drconv import DRConv2d

runner = CliRunner()


def two_drconv_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        DRConv2d(3, 8, 3, padding=1, regions=3), nn.BatchNorm2d(8), nn.ReLU(),
        DRConv2d(8, 4, 1, stride=2, regions=5),
    )


def test_guided_masks_are_the_argmax_of_each_guide():
    model = two_drconv_layers()
    inputs = torch.randn(2, 3, 8, 8)
    layers = guided_masks(model, inputs)
    assert [(layer.name, layer.regions, tuple(layer.masks.shape)) for layer in layers] == [
        ("0", 3, (2, 8, 8)), ("3", 5, (2, 4, 4))
    ]
    with torch.no_grad():
        first_guide = model[0].guide(inputs)
        second_input = model[2](model[1](model[0](inputs)))
        second_guide = model[3].guide(second_input)
    assert torch.equal(layers[0].masks, first_guide.argmax(dim=1))
    assert torch.equal(layers[1].masks, second_guide.argmax(dim=1))
    assert not model.training


def test_models_without_drconv_have_no_masks():
    with pytest.raises(ValueError, match="no DRConv layers"):
        guided_masks(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4))


def test_evenly_spaced_keeps_first_and_last():
    layers = [LayerMask(str(i), 2, torch.zeros(1, 1, 1, dtype=torch.long)) for i in range(10)]
    assert [layer.name for layer in evenly_spaced(layers, 4)] == ["0", "3", "6", "9"]
    assert evenly_spaced(layers, 0) == layers and evenly_spaced(layers, 20) == layers
    assert [layer.name for layer in evenly_spaced(layers, 1)] == ["0"]


@pytest.mark.parametrize("regions", [1, 4, 12, 30])
def test_region_colours_are_distinct(regions):
    colours = region_colours(regions)
    assert colours.shape == (regions, 3)
    assert len({tuple(np.round(colour, 3)) for colour in colours}) == regions


def test_render_masks_draws_one_row_per_image_in_region_colours(tmp_path):
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    masks[:, :, 2:] = 3  # two regions of a 4-region layer: colours 0 and 3
    out = render_masks(images, [LayerMask("stage.conv", 4, masks)], tmp_path / "grid.png", cell_inches=1.0)
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (2 * 100 + 40, 2 * 100, 3)  # rows x (image + one layer), 100 dpi
    palette = np.round(region_colours(4) * 255).astype(np.uint8)
    present = {region: int((picture == palette[region]).all(axis=2).sum()) for region in range(4)}
    assert present[0] > 100 and present[3] > 100 and present[1] == present[2] == 0


def _checkpoint(tmp_path, op: str, **options) -> str:
    data = get_dataset("synthetic", split="test", limit=4)
    config = model_config_for("shufflenetv2", data, width=0.5, op=op, **options)
    torch.manual_seed(0)
    model = create_model(**config)
    source = {"name": "synthetic", "data_path": None, "seed": 0}
    path = tmp_path / f"{op}.pt"
    Checkpoint(config, model.state_dict(), Normalization.of(data), source, {}).save(path)
    return str(path)


def test_masks_command_renders_a_checkpoint(tmp_path):
    out = tmp_path / "masks.png"
    checkpoint = _checkpoint(tmp_path, "drconv", regions=2)
    result = runner.invoke(app, ["masks", checkpoint, "--images", "2", "--layers", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 images x 3 of" in result.output
    assert Image.open(out).size == (4 * 150, 2 * 150 + 40)


def test_masks_command_errors_are_one_line(tmp_path):
    conv = runner.invoke(app, ["masks", _checkpoint(tmp_path, "conv")])
    assert conv.exit_code == 2 and "no DRConv layers" in conv.output
    missing = runner.invoke(app, ["masks", str(tmp_path / "nothing.pt")])
    assert missing.exit_code == 2 and "no such checkpoint file" in missing.output
