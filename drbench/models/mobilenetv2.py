"""MobileNetV2 (Sandler et al., CVPR 2018), the same architecture as torchvision's ``mobilenet_v2`` at any width.

>>> from drbench.models import create_model
>>> model = create_model("mobilenetv2", width=0.75, op="condconv", experts=8)
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from drbench.models.builder import GlobalAvgPool, LayerBuilder, Placement, UnitGuide, make_divisible, relu6
from drbench.models.registry import register_model

STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
STAGES = (  # expansion t, output channels c, repeats n, first stride s: the MobileNetV2 paper's Table 2
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand 1x1 (omitted when t = 1) -> 3x3 depthwise -> linear 1x1 projection, residual when shapes allow."""

    def __init__(
        self, layers: LayerBuilder, in_channels: int, out_channels: int, stride: int, expansion: int, act=relu6
    ) -> None:
        super().__init__()
        hidden = int(round(in_channels * expansion))
        self.residual = stride == 1 and in_channels == out_channels
        with layers.unit_guide(in_channels) as unit:
            expand = [] if expansion == 1 else [layers.conv_bn_act(in_channels, hidden, 1, act=act,
                                                                   tags=("expand",))]
            self.block = nn.Sequential(
                *expand,
                layers.conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=act, tags=("depthwise",)),
                layers.conv_bn_act(hidden, out_channels, 1, act=None, tags=("project",)),
            )
        self.guide = unit.guide  # DRConv's guide_scope="unit": one guide on the block's input for its DRConv layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with UnitGuide.applied(self.guide, x):
            out = self.block(x)
        return x + out if self.residual else out


def inverted_residual_stages(
    layers: LayerBuilder, in_channels: int, stages, width: float = 1.0, act=relu6
) -> tuple[dict[str, nn.Sequential], int]:
    """The stages of a (t, c, n, s) table, named ``stage1``, ``stage2``, ..., and their output channels
    (``c * width``, rounded)."""
    built = {}
    for index, (expansion, channels, repeats, stride) in enumerate(stages, start=1):
        out_channels = make_divisible(channels * width)
        blocks = []
        for repeat in range(repeats):
            blocks.append(
                InvertedResidual(layers, in_channels, out_channels, stride if repeat == 0 else 1, expansion, act)
            )
            in_channels = out_channels
        built[f"stage{index}"] = nn.Sequential(*blocks)
    return built, in_channels


PLACEMENTS = {
    "default": Placement(
        "every 1x1 conv of the inverted residual blocks (expand and project); the last 1x1 conv stays standard",
        lambda site: site.pointwise and "head" not in site.tags,
    ),
}


@register_model(
    "mobilenetv2",
    "MobileNetV2 (Sandler et al. 2018), torchvision-equal; any width 0.25-1.4",
    widths=(0.25, 0.35, 0.5, 0.75, 1.0, 1.4),
    placements=PLACEMENTS,
    any_width=True,
)
class MobileNetV2(nn.Sequential):
    """MobileNetV2 at any width: 3x3/2 stem, 7 stages of inverted residual blocks, 1x1 conv to 1280 channels
    (``1280 * width`` above 1), global average pool, dropout 0.2, classifier. Channels are rounded to multiples of
    8 (:func:`~drbench.models.builder.make_divisible`), so width 1.0 has torchvision's 3,504,872 parameters.

    Placements (what ``op`` replaces):

    - ``default``: the DRConv paper's "all the 1x1 standard convolutions in the backbone": the expand and project
      1x1 convs of every block. The last 1x1 conv (to 1280) is the head and stays standard, as conv5 in
      ShuffleNetV2; this reaches Table 1's 328M (DRConv) and 329M (CondConv).
    - ``pointwise``: every 1x1 conv, the last one included. ``all``: every conv, depthwise and stem included
      (CondConv's own setting).

    ``small_input=True``: stride 1 in the stem and in the first 24-channel block, for 32x32 images (final 4x4).
    """

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 1000,
        small_input: bool = False,
        layers: LayerBuilder | None = None,
    ) -> None:
        layers = layers or LayerBuilder.standard()
        stem_channels = make_divisible(STEM_CHANNELS * width)
        head_channels = make_divisible(HEAD_CHANNELS * max(1.0, width))
        table = list(STAGES)
        if small_input:
            table[1] = (*table[1][:3], 1)
        stem = layers.conv_bn_act(3, stem_channels, 3, 1 if small_input else 2, act=relu6, tags=("stem",))
        stages, channels = inverted_residual_stages(layers, stem_channels, table, width)
        head = layers.conv_bn_act(channels, head_channels, 1, act=relu6, tags=("head",))
        super().__init__(
            OrderedDict(
                stem=stem,
                **stages,
                head=head,
                pool=GlobalAvgPool(),
                classifier=nn.Sequential(nn.Dropout(0.2), nn.Linear(head_channels, num_classes)),
            )
        )
