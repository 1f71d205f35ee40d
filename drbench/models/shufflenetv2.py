"""ShuffleNetV2 (Ma et al., ECCV 2018), the same architecture as torchvision's ``shufflenet_v2_x*``.

>>> from drbench.models import create_model
>>> model = create_model("shufflenetv2", width=1.0, op="drconv", regions=8)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from drbench.models.builder import LayerBuilder, Placement, UnitGuide
from drbench.models.registry import register_model

STAGE_REPEATS = (4, 8, 4)
STAGE_CHANNELS = {  # conv1, stage2, stage3, stage4, conv5: the ShuffleNetV2 paper's Table 5
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    """A ShuffleNetV2 unit: the right branch is 1x1 -> 3x3 depthwise -> 1x1; the left branch is the identity
    half of the channels (stride 1) or a 3x3 depthwise -> 1x1 (stride 2); then a channel shuffle."""

    def __init__(self, layers: LayerBuilder, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        branch_channels = out_channels // 2
        self.stride = stride
        self.left = nn.Identity()
        if stride > 1:
            with layers.side_branch():
                self.left = nn.Sequential(
                    layers.conv_bn_act(in_channels, in_channels, 3, stride, groups=in_channels, act=None,
                                       tags=("left",)),
                    layers.conv_bn_act(in_channels, branch_channels, 1, tags=("left",)),
                )
        right_in = in_channels if stride > 1 else branch_channels
        with layers.unit_guide(right_in) as unit:
            self.right = nn.Sequential(
                layers.conv_bn_act(right_in, branch_channels, 1, tags=("right",)),
                layers.conv_bn_act(branch_channels, branch_channels, 3, stride, groups=branch_channels, act=None,
                                   tags=("right",)),
                layers.conv_bn_act(branch_channels, branch_channels, 1, tags=("right",)),
            )
        self.guide = unit.guide  # DRConv's guide_scope="unit": the authors' one masknet per unit, on its input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            kept, x = x.chunk(2, dim=1)
        else:
            kept = self.left(x)
        with UnitGuide.applied(self.guide, x):
            right = self.right(x)
        return channel_shuffle(torch.cat((kept, right), dim=1), 2)


PLACEMENTS = {
    "default": Placement(
        "every 1x1 conv of the units (both branches); the stem and conv5 stay standard",
        lambda site: site.pointwise and "head" not in site.tags,
    ),
    "right_branch": Placement(
        "the two 1x1 convs of each unit's right branch only", lambda site: site.pointwise and "right" in site.tags
    ),
}


@register_model(
    "shufflenetv2",
    "ShuffleNetV2 (Ma et al. 2018), torchvision-equal; widths 0.5x-2x",
    widths=tuple(STAGE_CHANNELS),
    placements=PLACEMENTS,
)
class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 at width 0.5, 1.0, 1.5 or 2.0: conv1 3x3/2, max-pool/2, stages 2-4 of 4/8/4 units, conv5 1x1,
    global average pool, fully connected layer (the only layer with a bias, as in torchvision).

    Placements (what ``op`` replaces):

    - ``default``: the DRConv paper's "all the 1x1 standard convolutions in the backbone": every 1x1 conv of the
      shuffle units, left and right branches. conv5 (the 1x1 conv to 1024 channels before pooling) is the head,
      not the backbone, and stays standard: with it DRConv's filter generator alone would add m*1024*C MACs and
      Table 1's 46M/157M are out of reach; without it they are met (see the README's complexity table).
    - ``right_branch``: only the two 1x1 convs of each unit's right branch (the authors' released code).
    - ``pointwise``: every 1x1 conv, conv5 included. ``all``: every conv, depthwise and stem included.

    ``small_input=True``: conv1 has stride 1 and there is no max-pool, for 32x32 images (final maps 4x4).
    """

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 1000,
        small_input: bool = False,
        layers: LayerBuilder | None = None,
    ) -> None:
        super().__init__()
        layers = layers or LayerBuilder.standard()
        conv1, *stage_channels, conv5 = STAGE_CHANNELS[width]
        self.conv1 = layers.conv_bn_act(3, conv1, 3, 1 if small_input else 2, tags=("stem",))
        self.maxpool = nn.Identity() if small_input else layers.max_pool(3, 2, 1)
        stages = []
        in_channels = conv1
        for repeats, out_channels in zip(STAGE_REPEATS, stage_channels):
            units = [ShuffleUnit(layers, in_channels, out_channels, 2)]
            units += [ShuffleUnit(layers, out_channels, out_channels, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = out_channels
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = layers.conv_bn_act(in_channels, conv5, 1, tags=("head",))
        self.fc = nn.Linear(conv5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean(dim=(2, 3)))
