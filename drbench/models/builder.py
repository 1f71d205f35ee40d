"""What every model family shares: channel rounding, conv sites, placements and the layer builder.

A model is written once, with plain convolutions in mind; :class:`LayerBuilder` decides, conv by conv, which
operator goes there (the placement), tracks the spatial size each conv sees (``local`` needs it) and builds it
through :func:`drbench.ops.create_conv`.

>>> builder = LayerBuilder("conv", (32, 32), placement=PLACEMENTS["pointwise"])
>>> stem = builder.conv_bn_act(3, 16, 3, stride=2)
>>> builder.size
(16, 16)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from drbench.ops import create_conv
from drbench.ops.drconv import DEFAULT_REGIONS, SharedGuide
from drbench.ops.region_conv_base import conv_output_size


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never below ``divisor`` nor more than 10% below.

    The MobileNet convention for width multipliers: every family scales its channels with
    ``make_divisible(channels * width)``.

    >>> make_divisible(32 * 0.35), make_divisible(1280 * 1.4), make_divisible(24 * 0.75)
    (16, 1792, 24)
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class ConvSite:
    """One convolution of a model: what a placement looks at to decide which operator goes there.

    ``name`` says where it is (a module path, or the model's role tags while it is being built); ``tags`` are
    roles a model family gives its convolutions (``"stem"``, ``"head"``, ``"right"``, ``"expand"``, ...);
    ``input_size`` is None where it is unknown (a conv that did not run in :func:`replace_convs`' probe).
    """

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    input_size: tuple[int, int] | None
    tags: frozenset[str] = frozenset()

    @property
    def pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.groups == 1

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    def describe(self) -> str:
        kh, kw = self.kernel_size
        kind = "depthwise " if self.depthwise else "grouped " if self.groups > 1 else ""
        size = f", input {self.input_size[0]}x{self.input_size[1]}" if self.input_size else ""
        return f"{self.name}: {kh}x{kw} {kind}conv {self.in_channels}->{self.out_channels} (groups={self.groups}{size})"


@dataclass(frozen=True)
class Placement:
    """Which convolutions of a model an operator replaces: a rule over :class:`ConvSite` and its description."""

    description: str
    selects: Callable[[ConvSite], bool]


PLACEMENTS = {
    "all": Placement("every convolution, depthwise and stem included", lambda site: True),
    "pointwise": Placement(
        "every 1x1 convolution (groups=1), the head's included",
        lambda site: site.pointwise,
    ),
}
"""Placements meaningful in every family (and selectors of :func:`drbench.models.replace_convs`)."""


def build_conv(op: str, site: ConvSite, *, padding, dilation=1, bias: bool = False, context: str = "", **op_kwargs):
    """Build operator ``op`` at ``site``; an operator that cannot go there raises ``ValueError`` naming the site."""
    try:
        return create_conv(
            op,
            site.in_channels,
            site.out_channels,
            site.kernel_size,
            stride=site.stride,
            padding=padding,
            dilation=dilation,
            groups=site.groups,
            bias=bias,
            input_size=site.input_size,
            **op_kwargs,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{context}cannot put {op!r} on {site.describe()}: {error}") from None


class UnitGuide:
    """What :meth:`LayerBuilder.unit_guide` yields: the unit's shared guide, made when its first layer asks."""

    def __init__(self, in_channels: int) -> None:
        self.in_channels = in_channels
        self.guide: SharedGuide | None = None

    def shared(self, op_options: dict) -> SharedGuide:
        """The unit's guide, made for the regions and guide bias of ``op_options`` on first use."""
        if self.guide is None:
            self.guide = SharedGuide(self.in_channels, op_options.get("regions", DEFAULT_REGIONS),
                                     op_options.get("guide_bias", False))
        return self.guide

    @staticmethod
    def applied(guide: SharedGuide | None, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """In a unit's forward: ``guide`` computed on the unit's input ``x`` for the block (nothing without one)."""
        return contextlib.nullcontext() if guide is None else guide.over(x)


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C): the mean over all positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


Activation = Callable[[int], nn.Module]


def relu(channels: int) -> nn.Module:
    return nn.ReLU(inplace=True)


def relu6(channels: int) -> nn.Module:
    return nn.ReLU6(inplace=True)


def prelu(channels: int) -> nn.Module:
    return nn.PReLU(channels)


class LayerBuilder:
    """Builds a model's convolutions in order, tracking the spatial size and applying a placement.

    Args:
        op: the operator for the convolutions the placement selects (the others are ``nn.Conv2d``).
        input_size: (H, W) of the model's input.
        placement: which convolutions become ``op``.
        context: prefix of error messages (model and placement names).
        op_kwargs: options of ``op`` (``regions=8``, ``experts=4``, ...).
    """

    def __init__(
        self, op: str, input_size: tuple[int, int], placement: Placement, context: str = "", **op_kwargs
    ) -> None:
        self.op, self.placement, self.context, self.op_kwargs = op, placement, context, op_kwargs
        self.size = tuple(input_size)
        self.sites: list[ConvSite] = []
        self._unit: UnitGuide | None = None

    @classmethod
    def standard(cls, input_size: tuple[int, int] = (224, 224)) -> "LayerBuilder":
        """A builder of standard convolutions only (what a model class builds when called directly)."""
        return cls("conv", input_size, PLACEMENTS["all"])

    def conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        *,
        groups: int = 1,
        padding: int | tuple[int, int] | None = None,
        tags: tuple[str, ...] = (),
    ) -> nn.Module:
        """A bias-free convolution at the current size (``padding``: 'same' for odd kernels); advances the size.

        Every convolution of these families is followed by BatchNorm, hence no bias.
        """
        kernel_size = _pair(kernel_size)
        padding = tuple(k // 2 for k in kernel_size) if padding is None else _pair(padding)
        site = ConvSite(
            name=f"conv #{len(self.sites)} [{', '.join(tags)}]" if tags else f"conv #{len(self.sites)}",
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            stride=_pair(stride),
            groups=groups,
            input_size=self.size,
            tags=frozenset(tags),
        )
        self.sites.append(site)
        selected = self.placement.selects(site)
        options = self.op_kwargs if selected else {}
        if options.get("guide_scope") == "unit":
            if self._unit is None:
                raise ValueError(
                    f"{self.context}cannot put {self.op!r} on {site.describe()}: guide_scope='unit' shares one guide "
                    "among the layers a model unit builds (ShuffleNetV2's right branch, the blocks of MobileNetV2 and "
                    "MobileFaceNet); this convolution is not in such a unit (on ShuffleNetV2 use placement "
                    "right_branch, the authors' own)")
            options = {**options, "shared_guide": self._unit.shared(options)}
        layer = build_conv(self.op if selected else "conv", site, padding=padding, context=self.context, **options)
        self.size = conv_output_size(self.size, kernel_size, site.stride, padding, 1)
        return layer

    def conv_bn_act(
        self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, *, act: Activation | None = relu,
        **conv_options,
    ) -> nn.Sequential:
        """:meth:`conv` (same options), BatchNorm, then ``act(out_channels)`` unless ``act`` is None."""
        conv = self.conv(in_channels, out_channels, kernel_size, stride, **conv_options)
        layers = [conv, nn.BatchNorm2d(out_channels)]
        if act is not None:
            layers.append(act(out_channels))
        return nn.Sequential(*layers)

    def max_pool(self, kernel_size: int, stride: int, padding: int) -> nn.MaxPool2d:
        self.size = conv_output_size(self.size, kernel_size, stride, padding, 1)
        return nn.MaxPool2d(kernel_size, stride, padding)

    @contextlib.contextmanager
    def unit_guide(self, in_channels: int) -> Iterator[UnitGuide]:
        """The operators built inside belong to one unit whose input has ``in_channels``: with DRConv's
        ``guide_scope="unit"`` they share one :class:`~drbench.ops.drconv.SharedGuide` (``UnitGuide.guide``, None
        when no layer asked for it), which the unit's forward computes on its input."""
        unit = UnitGuide(in_channels)
        self._unit = unit
        try:
            yield unit
        finally:
            self._unit = None

    @contextlib.contextmanager
    def side_branch(self) -> Iterator[None]:
        """Layers built inside run beside the main path: the size afterwards is the size before."""
        start = self.size
        yield
        self.size = start
