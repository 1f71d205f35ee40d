"""MobileFaceNet (Chen et al., CCBR 2018, arXiv 1804.07573): a face embedding network for 112x112 or 112x96 faces.

>>> from drbench.models import create_model
>>> model = create_model("mobilefacenet", input_size=(112, 96), op="drconv", regions=8)
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from drbench.models.builder import LayerBuilder, Placement, prelu
from drbench.models.mobilenetv2 import inverted_residual_stages
from drbench.models.registry import register_model

STEM_CHANNELS, HEAD_CHANNELS, EMBEDDING_SIZE = 64, 512, 128
STAGES = (  # expansion t, output channels c, repeats n, first stride s: the MobileFaceNet paper's Table 1
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)

PLACEMENTS = {
    "default": Placement(
        "the 1x1 convs of every bottleneck block (expand and project)",
        lambda site: site.pointwise and bool(site.tags & {"expand", "project"}),
    ),
    "last3": Placement(
        "the last three layers: 1x1 conv to 512, global depthwise conv, linear 1x1 embedding conv",
        lambda site: bool(site.tags & {"head", "gdconv", "embedding"}),
    ),
}


@register_model(
    "mobilefacenet",
    "MobileFaceNet (Chen et al. 2018), face embeddings at 112x112 or 112x96; PReLU",
    widths=(1.0,),
    placements=PLACEMENTS,
    num_classes=EMBEDDING_SIZE,
    input_size=(112, 112),
)
class MobileFaceNet(nn.Sequential):
    """MobileFaceNet: 3x3/2 conv 64, 3x3 depthwise 64, five stages of bottlenecks (PReLU), 1x1 conv 512, a linear
    global depthwise conv over the whole final map (7x7 at 112x112, 7x6 at 112x96), and a linear 1x1 conv to the
    embedding, each followed by BatchNorm.

    The output is the embedding: ``num_classes`` is its size (128 by default, as in the paper). A face
    recognition loss (ArcFace, AM-Softmax) or a linear classifier goes on top of it, outside the model.

    Placements (what ``op`` replaces):

    - ``default``: the DRConv paper's Section 4.2, "1x1 standard convolution in all bottleneck blocks": the expand
      and project convs of every bottleneck (Table 2's DRConv- and CondConv-MobileFaceNet).
    - ``last3``: the last three layers (1x1 conv to 512, global depthwise conv, embedding conv), where the paper
      puts local convolution ("we apply local convolution in the last three layers"; Local-MobileFaceNet).
    - ``pointwise``: every 1x1 conv. ``all``: every conv, depthwise and stem included.

    ``small_input=True``: stride 1 in the first conv, for 32x32 images (final map 4x4).
    """

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = EMBEDDING_SIZE,
        small_input: bool = False,
        layers: LayerBuilder | None = None,
    ) -> None:
        layers = layers or LayerBuilder.standard((112, 112))
        stem = nn.Sequential(
            layers.conv_bn_act(3, STEM_CHANNELS, 3, 1 if small_input else 2, act=prelu, tags=("stem",)),
            layers.conv_bn_act(STEM_CHANNELS, STEM_CHANNELS, 3, groups=STEM_CHANNELS, act=prelu, tags=("stem",)),
        )
        stages, channels = inverted_residual_stages(layers, STEM_CHANNELS, STAGES, act=prelu)
        head = layers.conv_bn_act(channels, HEAD_CHANNELS, 1, act=prelu, tags=("head",))
        gdconv = layers.conv_bn_act(
            HEAD_CHANNELS, HEAD_CHANNELS, layers.size, groups=HEAD_CHANNELS, padding=0, act=None, tags=("gdconv",)
        )
        embedding = layers.conv_bn_act(HEAD_CHANNELS, num_classes, 1, act=None, tags=("embedding",))
        super().__init__(
            OrderedDict(stem=stem, **stages, head=head, gdconv=gdconv, embedding=embedding, flatten=nn.Flatten(1))
        )
