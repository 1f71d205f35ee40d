"""Guided masks of DRConv layers drawn beside their images, as in the paper's Fig. 3.

Each DRConv layer keeps the argmax region of every output position from its last forward pass
(``DRConv2d.last_mask``). :func:`guided_masks` runs a batch through a model and collects them;
:func:`render_masks` draws a PNG grid: one row per image, the image first, then one column per layer with one
colour per region.

With ``model.pt`` from ``drbench train shufflenetv2 --op drconv --checkpoint model.pt``:

>>> from drbench.checkpoint import load_checkpoint
>>> checkpoint = load_checkpoint("model.pt")
>>> images, layers = checkpoint_masks(checkpoint, count=4)
>>> render_masks(images, layers, "masks.png").is_file()
True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from drbench.checkpoint import Checkpoint, CheckpointError
from drbench.data import get_dataset
from drbench.ops.drconv import DRConv2d


@dataclass(frozen=True)
class LayerMask:
    """The guided masks of one DRConv layer: ``masks`` (N, H', W') holds region indices in ``[0, regions)``."""

    name: str
    regions: int
    masks: torch.Tensor


@torch.inference_mode()
def guided_masks(model: nn.Module, inputs: torch.Tensor) -> list[LayerMask]:
    """Run ``inputs`` through ``model`` in eval mode; the guided mask of every DRConv layer, in module order."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, DRConv2d)]
    if not layers:
        raise ValueError("the model has no DRConv layers: guided masks exist only for --op drconv")
    model.eval()(inputs)
    return [LayerMask(name, module.regions, module.last_mask.cpu()) for name, module in layers]


def checkpoint_masks(checkpoint: Checkpoint, count: int = 4) -> tuple[torch.Tensor, list[LayerMask]]:
    """The first ``count`` held-out images of the checkpoint's data set (uint8) and the masks its model draws."""
    try:
        test_set = get_dataset(split="test", limit=count, **checkpoint.data)
    except TypeError as error:  # a key get_dataset does not take
        raise CheckpointError(f"the checkpoint's data set does not load ({error})") from None
    model = checkpoint.build_model()
    return test_set.images, guided_masks(model, checkpoint.normalization(test_set.images))


def evenly_spaced(layers: list[LayerMask], count: int) -> list[LayerMask]:
    """``count`` layers from first to last (all of them when ``count`` is 0 or not smaller than their number)."""
    if count <= 0 or count >= len(layers):
        return layers
    if count == 1:
        return layers[:1]
    return [layers[round(i * (len(layers) - 1) / (count - 1))] for i in range(count)]


def render_masks(
    images: torch.Tensor, layers: list[LayerMask], out: str | Path, *, max_layers: int = 6, cell_inches: float = 1.5
) -> Path:
    """Draw ``images`` (uint8 (N, 3, H, W)) beside the masks of up to ``max_layers`` layers into PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    shown = evenly_spaced(layers, max_layers)
    rows, columns = images.shape[0], 1 + len(shown)
    figure, axes = plt.subplots(
        rows, columns, figsize=(cell_inches * columns, cell_inches * rows + 0.4), squeeze=False
    )
    for row in range(rows):
        axes[row, 0].imshow(images[row].permute(1, 2, 0).numpy())
        for column, layer in enumerate(shown, start=1):
            colours = ListedColormap(region_colours(layer.regions))
            axes[row, column].imshow(
                layer.masks[row].numpy(), cmap=colours, vmin=-0.5, vmax=layer.regions - 0.5, interpolation="nearest"
            )
    axes[0, 0].set_title("image", fontsize=8)
    for column, layer in enumerate(shown, start=1):
        height, width = layer.masks.shape[-2:]
        axes[0, column].set_title(f"{layer.name}\n{height}x{width}, m={layer.regions}", fontsize=7)
    for axis in axes.flat:
        axis.set_axis_off()
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def region_colours(regions: int) -> np.ndarray:
    """One distinct RGB colour per region: a qualitative palette, evenly spaced hues beyond 20 regions."""
    from matplotlib import colormaps

    if regions <= 10:
        return colormaps["tab10"](np.arange(regions))[:, :3]
    if regions <= 20:
        return colormaps["tab20"](np.arange(regions))[:, :3]
    return colormaps["hsv"](np.linspace(0, 1, regions, endpoint=False))[:, :3]
