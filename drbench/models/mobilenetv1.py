"""MobileNetV1 (Howard et al., 2017), as TF-slim's ``mobilenet_v1`` at widths 0.25, 0.5, 0.75 and 1.0.

>>> from drbench.models import create_model
>>> model = create_model("mobilenetv1", width=0.5, op="drconv", regions=8)
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from drbench.models.builder import GlobalAvgPool, LayerBuilder, Placement, make_divisible
from drbench.models.registry import register_model

STEM_CHANNELS = 32
BLOCKS = (  # output channels, stride of each depthwise separable block: the MobileNetV1 paper's Table 1
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)


def separable_block(layers: LayerBuilder, in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv -> BN -> ReLU -> 1x1 pointwise conv -> BN -> ReLU."""
    return nn.Sequential(
        layers.conv_bn_act(in_channels, in_channels, 3, stride, groups=in_channels, tags=("depthwise",)),
        layers.conv_bn_act(in_channels, out_channels, 1, tags=("pointwise",)),
    )


@register_model(
    "mobilenetv1",
    "MobileNetV1 (Howard et al. 2017); widths 0.25-1.0",
    widths=(0.25, 0.5, 0.75, 1.0),
    placements={"default": Placement("every 1x1 (pointwise) conv", lambda site: site.pointwise)},
)
class MobileNetV1(nn.Sequential):
    """MobileNetV1: 3x3/2 stem, 13 depthwise separable blocks, global average pool, classifier (with bias).
    Channels are ``make_divisible(c * width)`` (equal to TF-slim's ``int(c * width)`` at the published widths).

    Placements (what ``op`` replaces):

    - ``default``: the DRConv paper's "all the 1x1 standard convolutions in the backbone": the pointwise conv of
      every block (the network has no other 1x1 conv), as in Table 1's DRConv-MobileNetV1 (610M).
    - ``pointwise``: the same here. ``all``: every conv, depthwise and stem included.

    ``small_input=True``: stride 1 in the stem and in the first 128-channel block, for 32x32 images (final 4x4).
    """

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 1000,
        small_input: bool = False,
        layers: LayerBuilder | None = None,
    ) -> None:
        layers = layers or LayerBuilder.standard()
        table = list(BLOCKS)
        if small_input:
            table[1] = (table[1][0], 1)
        in_channels = make_divisible(STEM_CHANNELS * width)
        named = {"stem": layers.conv_bn_act(3, in_channels, 3, 1 if small_input else 2, tags=("stem",))}
        for index, (channels, stride) in enumerate(table, start=1):
            out_channels = make_divisible(channels * width)
            named[f"block{index}"] = separable_block(layers, in_channels, out_channels, stride)
            in_channels = out_channels
        super().__init__(OrderedDict(**named, pool=GlobalAvgPool(), classifier=nn.Linear(in_channels, num_classes)))
