"""Dynamic Region-Aware Convolution (DRConv, Chen et al., CVPR 2021), registered as ``drconv``.

A k x k standard convolution from the input to m channels gives the guided feature F (Section 3.2); each output
position takes the region ``argmax_t F[t]`` and is computed with that region's filter, which a filter generator
predicts from the input (Section 3.3). The guided mask learns through the softmax approximation of Eq. 6-8
(see :mod:`drbench.ops.functional`).

>>> import torch
>>> layer = DRConv2d(16, 32, 1, regions=4)
>>> layer(torch.randn(2, 16, 14, 14)).shape
torch.Size([2, 32, 14, 14])
>>> layer.last_mask.shape          # argmax region per output position, for visualisation
torch.Size([2, 14, 14])
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from drbench.ops.functional import default_region_conv_impl, region_conv2d, region_conv_impls
from drbench.ops.region_conv_base import conv_output_size
from drbench.ops.region_conv_cpu import available as compiled_kernels_available, extension as compiled_kernels
from drbench.ops.region_conv_cpu import counting_dispatch, executed_macs, factored_region_conv2d, pointwise_forward
from drbench.ops.registry import register_op

GENERATORS = ("dynamic", "static", "mixture")
INITS = ("authors", "independent")
"""How a :class:`DRConv2d` starts. ``"authors"`` (default), as in the authors' released code (megvii-research/DRConv,
``DRConv.py``): every region's filter starts within a few percent of the others, so all regions score alike and the
guide starts with almost no gradient. ``"independent"``: each region's filter drawn on its own (drbench before
0.3), kept for the init ablation."""
DEFAULT_REGIONS = 8
"""m, the paper's default region count."""
GUIDE_SCOPES = ("layer", "unit")
"""Where a DRConv layer's guide comes from. ``"layer"`` (default): its own k x k guide convolution on its input.
``"unit"``: one :class:`SharedGuide` per model unit, shared by the unit's DRConv layers, as in the authors'
ShuffleNetV2 (``ShuffleNetV2_pytorch.py``: one ``masknet`` per block for ``conva_right`` and ``convc_right``); only a
model's units set it up (:meth:`drbench.models.builder.LayerBuilder.unit_guide`)."""
STRUCTURED = "structured"
"""The ``impl`` that computes the layer from its generator's factors (:func:`~drbench.ops.region_conv_cpu.
factored_region_conv2d`): the ``dynamic`` and ``static`` generators, on CPU where the compiled kernels build."""


def drconv_impls(device_type: str | None = None) -> list[str]:
    """Every ``impl`` a :class:`DRConv2d` takes: the region_conv2d implementations, and "structured"; given a
    ``device_type``, only those that run there.

    >>> "reference" in drconv_impls() and "structured" in drconv_impls()
    True
    """
    structured = device_type is None or (device_type == "cpu" and compiled_kernels_available())
    return region_conv_impls(device_type) + ([STRUCTURED] if structured else [])


def _conv_init_std(fan_in: int) -> float:
    """Std of ``nn.Conv2d``'s default weight init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), ...)."""
    return 1.0 / math.sqrt(3 * fan_in)


@functools.cache  # decided once per process: DRConv2d.forward asks on every call, and at batch 1 a call is short
def default_drconv_impl(device_type: str, generator: str = "dynamic") -> str:
    """What a :class:`DRConv2d` with ``generator`` runs on tensors of ``device_type`` when no ``impl`` is named:
    the structured path where it runs (dynamic and static generators), else the device's default region_conv2d
    implementation.

    >>> default_drconv_impl("meta")
    'fast'
    """
    if generator != "mixture" and STRUCTURED in drconv_impls(device_type):
        return STRUCTURED
    return default_region_conv_impl(device_type)


class DynamicFilterGenerator(nn.Module):
    """The paper's generator G (Section 3.3): AAP to k x k -> 1x1 conv + sigmoid -> 1x1 conv with groups = m.

    The second conv maps each group of ``hidden_channels / m`` channels to one region's O*C filter values at each of
    the k x k positions, so the m filters are (B, m, O, C, k, k). The paper does not give the hidden width; the
    default ``hidden_channels = m`` (one hidden unit per region) lands at Table 1's MACs (45.3M for ShuffleNetV2
    0.5x against the published 46M), where m^2 (the unofficial code's choice) counts 52.5M.

    That grouped 1x1 conv is computed as the batched matrix product it is, one per region (``weight`` is its
    (m, hidden/m, O*C) kernel): the same values and MACs, but 10x faster forward and backward on CPU than
    ``nn.Conv2d`` with thousands of output channels per group, which dominated DRConv's training time.

    Init: the generated filter is ``sigmoid(h) * w + b`` per hidden unit; w and b start with the std of a
    ``nn.Conv2d`` weight scaled by 1/sqrt(1 + 0.25 * hidden/m) (sigmoid is about 0.5 at init), so the generated
    filters start with the variance of the convolution they replace. With ``init="authors"`` every region starts
    with the same w and b and the hidden conv as the authors' routing layer (weights N(0, 0.01), bias 0), so the
    sigmoids are 0.5 within about 1% and the regions' filters differ by as little; ``"independent"`` draws each
    region's w and b (and the hidden conv) on its own.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], regions: int,
                 hidden_channels: int, init: str = "authors"):
        super().__init__()
        if hidden_channels < regions or hidden_channels % regions:
            raise ValueError(
                f"DRConv2d: hidden_channels must be a positive multiple of regions={regions}, got {hidden_channels}"
            )
        self.shape = (regions, out_channels, in_channels, *kernel_size)
        self.pool = nn.AdaptiveAvgPool2d(kernel_size)
        self.hidden = nn.Conv2d(in_channels, hidden_channels, 1)
        std = _conv_init_std(in_channels * kernel_size[0] * kernel_size[1])
        std /= math.sqrt(1 + 0.25 * hidden_channels / regions)
        filter_size = out_channels * in_channels
        drawn_regions = 1 if init == "authors" else regions
        weight = torch.randn(drawn_regions, hidden_channels // regions, filter_size) * std
        bias = torch.randn(drawn_regions, 1, filter_size) * std
        self.weight = nn.Parameter(weight.expand(regions, -1, -1).clone())
        self.bias = nn.Parameter(bias.expand(regions, -1, -1).clone())
        if init == "authors":
            _init_as_authors_routing(self.hidden)

    def hidden_units(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden conv's output on the pooled input, before the sigmoid, (B, hidden, kh, kw). For a 1x1 kernel
        the pooling is a mean and the conv a matrix product, computed as such (a layer at batch 1 spends more in
        the calls than in the arithmetic)."""
        hidden = self.hidden
        if self.pool.output_size != (1, 1):
            return hidden(self.pool(x))
        weight = hidden.weight.view(hidden.out_channels, -1).t()
        pooled = x.mean(dim=(2, 3))
        out = pooled @ weight if hidden.bias is None else torch.addmm(hidden.bias, pooled, weight)
        return out.view(*out.shape, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        regions, per_region, filter_size = self.weight.shape
        hidden = torch.sigmoid(self.hidden_units(x))  # (B, m * per_region, kh, kw)
        taps = hidden.shape[-2] * hidden.shape[-1]
        # (m, B * taps, per_region) @ (m, per_region, O*C): the filter value at every tap of every sample
        hidden = hidden.view(batch, regions, per_region, taps).permute(1, 0, 3, 2).reshape(regions, -1, per_region)
        filters = torch.baddbmm(self.bias, hidden, self.weight).view(regions, batch, taps, filter_size)
        # region-major in memory: region_conv2d makes them contiguous once (a copy here would be undone by its own
        # backward copy)
        return filters.permute(1, 0, 3, 2).view(batch, *self.shape)

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The filters as :func:`~drbench.ops.region_conv_cpu.factored_region_conv2d` takes them, never built:
        ``filter[b, t, :, :, tap] = bias_t + sum_q s[b, t, q, tap] * W[t, q]`` gives coefficients
        ``[s, 1]`` (B, m, hidden/m + 1, kh*kw) and weights ``[W[:, 0], ..., W[:, -1], bias]``, each (m, O, C)."""
        regions, out_channels, in_channels = self.shape[:3]
        per_region = self.weight.shape[1]
        if (self.pool.output_size == (1, 1) and x.device.type == "cpu" and compiled_kernels_available()
                and not _differentiated(x, self)):  # one compiled call where ten torch calls cost more
            hidden = self.hidden
            coeffs = compiled_kernels().pointwise_coefficients(x, hidden.weight.flatten(1), hidden.bias, regions)
            if counting_dispatch():  # the hidden conv's product, which FlopCounterMode cannot see in the kernel
                executed_macs(x, x.shape[0] * hidden.out_channels * hidden.in_channels)
        else:
            hidden = torch.sigmoid(self.hidden_units(x)).view(x.shape[0], regions, per_region, -1)
            coeffs = F.pad(hidden, (0, 0, 0, 1), value=1.0)  # the bias term's coefficient, 1 at every tap
        weight = self.weight.view(regions, per_region, out_channels, in_channels)
        return coeffs, [*weight.unbind(1), self.bias.view(regions, out_channels, in_channels)]


class StaticFilterGenerator(nn.Module):
    """m learned filters shared by all samples: isolates the value of the regions from that of dynamic filters.

    Each filter starts as an ``nn.Conv2d`` weight: one draw copied to every region with ``init="authors"`` (the
    regions then part as each learns from its own positions), one draw per region with ``"independent"``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], regions: int,
                 init: str = "authors"):
        super().__init__()
        drawn = torch.empty(1 if init == "authors" else regions, out_channels, in_channels, *kernel_size)
        for region_weight in drawn:
            nn.init.kaiming_uniform_(region_weight, a=math.sqrt(5))
        self.weight = nn.Parameter(drawn.expand(regions, *drawn.shape[1:]).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(x.shape[0], *self.weight.shape)

    def factors(self, x: torch.Tensor) -> tuple[None, list[torch.Tensor]]:
        """No coefficients: each region's filter, (m, O, C * kh * kw), is shared by the batch."""
        return None, [self.weight.flatten(2)]


class MixtureFilterGenerator(nn.Module):
    """The authors' released generator (megvii-research/DRConv, ``DRConv.py``): each region's filter mixes ``bases``
    basis kernels shared by all regions.

    Mixing coefficients are ``2 * sigmoid(Linear(GAP(x))) / bases``, one set per region, so each filter starts as
    about the mean of the bases. Bases start He-uniform, U(-sqrt(6/n), sqrt(6/n)) with n the fan-in, as the authors'
    ``reset_parameters``. The routing layer starts at N(0, 0.01) with bias 0 (``init="authors"``), which makes every
    region's coefficients 1/bases within about 1%; ``"independent"`` keeps ``nn.Linear``'s default init, whose
    routing differs by region from the start.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], regions: int, bases: int,
                 init: str = "authors"):
        super().__init__()
        if bases < 1:
            raise ValueError(f"DRConv2d: bases must be >= 1, got {bases}")
        self.regions = regions
        self.bases = nn.Parameter(torch.empty(bases, out_channels, in_channels, *kernel_size))
        bound = math.sqrt(6 / (in_channels * kernel_size[0] * kernel_size[1]))
        nn.init.uniform_(self.bases, -bound, bound)
        self.routing = nn.Linear(in_channels, regions * bases)
        if init == "authors":
            _init_as_authors_routing(self.routing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, bases = x.shape[0], self.bases.shape[0]
        weights = (2 / bases) * torch.sigmoid(self.routing(x.mean(dim=(2, 3)))).view(batch * self.regions, -1)
        filters = weights @ self.bases.flatten(1)
        return filters.view(batch, self.regions, *self.bases.shape[1:])


def _init_as_authors_routing(layer: nn.Linear | nn.Conv2d) -> None:
    """The authors' routing layer init (``DRConv.reset_parameters``): weights N(0, 0.01), bias 0."""
    nn.init.normal_(layer.weight, std=0.01)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class SharedGuide(nn.Module):
    """One guide for the DRConv layers of a unit (``guide_scope="unit"``), as the authors' ShuffleNetV2 ``masknet``:
    a 1x1 convolution to m channels, without bias by default, over the unit's input. The unit computes it once
    per forward (:meth:`over`); each layer reads it at its own output resolution (:meth:`at`), resized by nearest
    neighbour where a stride changed it (the authors' ``F.interpolate``). The layers' Eq. 6-8 gradients add up in
    its weights.

    >>> guide, x = SharedGuide(16, regions=4), torch.randn(2, 16, 8, 8)
    >>> with guide.over(x):
    ...     guide.at((4, 4)).shape
    torch.Size([2, 4, 4, 4])
    """

    def __init__(self, in_channels: int, regions: int, bias: bool = False) -> None:
        super().__init__()
        self.guide = nn.Conv2d(in_channels, regions, 1, bias=bias)
        self._feature: torch.Tensor | None = None

    @contextlib.contextmanager
    def over(self, x: torch.Tensor) -> Iterator[None]:
        """The guided feature of the unit's input ``x`` is what :meth:`at` returns inside the block."""
        self._feature = self.guide(x)
        try:
            yield
        finally:
            self._feature = None

    def at(self, size: tuple[int, int]) -> torch.Tensor:
        """The guided feature (B, m, H', W') at the spatial ``size`` of a layer's output."""
        if self._feature is None:
            raise RuntimeError("SharedGuide: a DRConv layer with a unit's guide ran outside the unit's forward")
        feature = self._feature
        return feature if tuple(feature.shape[-2:]) == tuple(size) else F.interpolate(feature, size, mode="nearest")


class DRConv2d(nn.Module):
    """Dynamic Region-Aware Convolution, a drop-in for ``nn.Conv2d`` (groups = 1).

    Args:
        regions: m, the number of regions (and of filters per sample); the paper's default is 8.
        generator: ``"dynamic"`` (the paper's Section 3.3 design), ``"static"`` (m learned filters shared by all
            samples) or ``"mixture"`` (each region's filter mixes ``bases`` basis kernels, CondConv-style).
        hidden_channels: hidden width of the dynamic generator, a multiple of ``regions`` (default ``regions``).
        bases: basis kernels of the mixture generator (default 8).
        init: ``"authors"`` (every region's filter starts within a few percent of the others, as in the authors'
            code) or ``"independent"`` (each region drawn on its own); see :data:`INITS`.
        guide_bias: whether the guide convolution has a bias (the authors' has none).
        shared_guide: a unit's :class:`SharedGuide` to take the guided feature from instead of a guide of the
            layer's own (:data:`GUIDE_SCOPES`); models pass it, for the ``guide_scope="unit"`` option.
        impl: how to compute the layer (:func:`drconv_impls`): ``"structured"`` from the generator's factors, or
            a :func:`~drbench.ops.functional.region_conv2d` implementation on the generated filters. Default: the
            structured path where it runs (dynamic and static generators, CPU, compiled kernels built), else the
            device's default region_conv2d implementation
            (:func:`~drbench.ops.functional.default_region_conv_impl`).

    The guide convolution uses the same kernel, stride, padding and dilation as the layer, so the guided
    feature is at the output resolution; it has PyTorch's default conv init, as the authors' ``masknet``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        regions: int = DEFAULT_REGIONS,
        generator: str = "dynamic",
        hidden_channels: int | None = None,
        bases: int = 8,
        init: str = "authors",
        guide_bias: bool = False,
        shared_guide: SharedGuide | None = None,
        impl: str | None = None,
    ):
        super().__init__()
        if groups != 1:
            raise ValueError(
                f"DRConv2d supports groups=1 only (got groups={groups}); use condconv or conv for grouped and "
                "depthwise convolutions"
            )
        if regions < 1:
            raise ValueError(f"DRConv2d: regions must be >= 1, got {regions}")
        if init not in INITS:
            raise ValueError(f"DRConv2d: init must be one of {INITS}, got {init!r}")
        if impl is not None and impl not in drconv_impls():
            raise ValueError(f"DRConv2d: impl must be one of {drconv_impls()}, got {impl!r}")
        if impl == STRUCTURED and generator == "mixture":
            raise ValueError("DRConv2d: impl='structured' needs the dynamic or static generator (the mixture "
                             "generator's filters have no batch-shared factors)")
        kernel_size = _pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.regions, self.generator_name, self.init, self.impl = regions, generator, init, impl
        if shared_guide is not None and shared_guide.guide.out_channels != regions:
            raise ValueError(f"DRConv2d: the shared guide scores {shared_guide.guide.out_channels} regions, the "
                             f"layer has regions={regions}")
        self.shared_guide = shared_guide
        self.guide = None
        if shared_guide is None:
            self.guide = nn.Conv2d(in_channels, regions, kernel_size, self.stride, self.padding, self.dilation,
                                   bias=guide_bias)
        self._pointwise_guide = kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        if generator == "dynamic":
            self.generator = DynamicFilterGenerator(
                in_channels, out_channels, kernel_size, regions, hidden_channels or regions, init
            )
        elif generator == "static":
            self.generator = StaticFilterGenerator(in_channels, out_channels, kernel_size, regions, init)
        elif generator == "mixture":
            self.generator = MixtureFilterGenerator(in_channels, out_channels, kernel_size, regions, bases, init)
        else:
            raise ValueError(f"DRConv2d: generator must be one of {GENERATORS}, got {generator!r}")
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._last_guide: torch.Tensor | None = None  # what last_mask comes from, made on demand
        self._last_mask: torch.Tensor | None = None

    @property
    def last_mask(self) -> torch.Tensor | None:
        """The region selected at each output position (B, H', W') in the last forward; None before any."""
        if self._last_mask is None and self._last_guide is not None:
            self._last_mask = self._last_guide.argmax(dim=1)
        return self._last_mask

    def guided_feature(self, x: torch.Tensor) -> torch.Tensor:
        """The guide convolution's output F (B, m, H', W'). A pointwise guide is computed as the batched matrix
        product it is: oneDNN's convolution with m = 8 output channels ran 4.5x slower than ``baddbmm`` on this CPU
        (B=32, C=116, 28x28), as slow as a fifth of the whole layer. With a unit's guide, that guide's feature at
        this layer's output size."""
        if self.shared_guide is not None:
            size = x.shape[-2:] if self._pointwise_guide else conv_output_size(
                x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation)
            return self.shared_guide.at(size)
        guide = self.guide
        if not self._pointwise_guide:
            return guide(x)
        batch, channels, height, width = x.shape
        weight = guide.weight.view(1, -1, channels).expand(batch, -1, -1)
        flat = x.reshape(batch, channels, -1)
        out = torch.bmm(weight, flat) if guide.bias is None else torch.baddbmm(guide.bias.view(1, -1, 1), weight, flat)
        return out.view(batch, -1, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.impl or default_drconv_impl(x.device.type, self.generator_name)
        if impl == STRUCTURED and self._pointwise_guide and self.guide is not None and not _differentiated(x, self):
            # the guide convolution computed inside the region convolution, block by block (pointwise_forward)
            coeffs, weights = self.generator.factors(x)
            out, self._last_mask = pointwise_forward(x, self.guide.weight, self.guide.bias, coeffs, weights,
                                                     self.bias)
            self._last_guide = None
            return out
        guide = self.guided_feature(x)
        self._last_guide, self._last_mask = guide.detach(), None
        if impl == STRUCTURED:
            coeffs, weights = self.generator.factors(x)
            return factored_region_conv2d(x, guide, coeffs, weights, self.kernel_size, self.stride, self.padding,
                                          self.dilation, self.bias)
        out = region_conv2d(x, guide, self.generator(x), self.stride, self.padding, self.dilation, impl=impl)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, regions={self.regions}, "
            f"generator={self.generator_name!r}, init={self.init!r}"
            + (", shared guide" if self.shared_guide is not None else "")
        )


def _differentiated(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether autograd records a call of ``module`` on ``x``, or a tracer (fvcore's MAC count) watches it: only
    otherwise may the layer run fused kernels that neither sees."""
    if torch.jit.is_tracing():
        return True
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


@register_op(
    "drconv",
    "Dynamic Region-Aware Convolution: m learned regions, one generated filter each",
    options=("regions", "generator", "hidden_channels", "bases", "init", "guide_bias", "guide_scope", "impl"),
    model_args=("shared_guide",),
)
def build_drconv(in_channels: int, out_channels: int, kernel_size, guide_scope: str = "layer", **kwargs) -> DRConv2d:
    """A :class:`DRConv2d`. ``guide_scope="unit"`` takes effect through the ``shared_guide`` a model's unit passes
    in; a layer built on its own (as a suite's option check builds one) has no unit and keeps a guide of its own, and
    models refuse the option where no unit builds the layer (:meth:`~drbench.models.builder.LayerBuilder.conv`)."""
    if guide_scope not in GUIDE_SCOPES:
        raise ValueError(f"DRConv2d: guide_scope must be one of {GUIDE_SCOPES}, got {guide_scope!r}")
    return DRConv2d(in_channels, out_channels, kernel_size, **kwargs)
