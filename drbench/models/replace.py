"""Swap an operator into any existing model: :func:`replace_convs`.

>>> import torch.nn as nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1))
>>> replace_convs(net, "drconv", where="pointwise", regions=4)[2].__class__.__name__
'DRConv2d'
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
from torch.nn.modules.utils import _pair

from drbench.models.builder import PLACEMENTS, ConvSite, build_conv
from drbench.models.probe import example_input, image_shape, inference
from drbench.ops import get_op

Selector = str | Callable[[ConvSite], bool]


def replace_convs(
    model: nn.Module,
    op: str,
    where: Selector = "pointwise",
    input_size: int | tuple[int, ...] | None = None,
    **op_kwargs,
) -> nn.Module:
    """Replace, in place, the ``nn.Conv2d`` modules of ``model`` that ``where`` selects by operator ``op``.

    Each new operator keeps the replaced convolution's channels, kernel, stride, padding, dilation, groups and
    bias (not its weights: the operators are parametrised differently). ``where`` is ``"pointwise"`` (every 1x1
    conv with groups=1), ``"all"``, or a predicate over :class:`~drbench.models.builder.ConvSite` (its ``name`` is
    the module path). ``input_size`` (an int, (H, W) or (C, H, W)) lets one example forward pass record each
    convolution's input size; operators that need it (``local``) require it, and predicates can read it.
    Convolutions inside drbench's own operators (a DRConv's guide conv, its generator) are never replaced.
    Returns ``model``.
    """
    selects = _selector(where)
    spec = get_op(op)
    if spec.needs_input_size and input_size is None:
        raise ValueError(f"replace_convs: operator {op!r} needs input_size, the size of the model's input")
    sizes = _conv_input_sizes(model, image_shape(input_size)) if input_size is not None else {}
    for name, conv in _replaceable_convs(model):
        site = ConvSite(
            name=name,
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            groups=conv.groups,
            input_size=sizes.get(name),
        )
        if not selects(site):
            continue
        if spec.needs_input_size and site.input_size is None:
            raise ValueError(f"replace_convs: {name} did not run on the example input, so {op!r} cannot be sized")
        if conv.padding_mode != "zeros":
            raise ValueError(f"replace_convs: {name} pads with {conv.padding_mode!r}; the operators pad with zeros")
        replacement = build_conv(
            op,
            site,
            padding=_explicit_padding(conv),
            dilation=conv.dilation,
            bias=conv.bias is not None,
            context="replace_convs: ",
            **op_kwargs,
        )
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, replacement.to(conv.weight.device, conv.weight.dtype))
    return model


def _selector(where: Selector) -> Callable[[ConvSite], bool]:
    if callable(where):
        return where
    if where not in PLACEMENTS:
        raise ValueError(f"replace_convs: where must be a predicate or one of: {', '.join(PLACEMENTS)}; got {where!r}")
    return PLACEMENTS[where].selects


def _replaceable_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The model's own ``nn.Conv2d`` modules, not those inside drbench operators."""
    operator_prefixes = [
        f"{name}." for name, module in model.named_modules() if type(module).__module__.startswith("drbench.ops.")
    ]
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and not any(name.startswith(prefix) for prefix in operator_prefixes)
    ]


def _conv_input_sizes(model: nn.Module, shape: tuple[int, int, int]) -> dict[str, tuple[int, int]]:
    sizes: dict[str, tuple[int, int]] = {}

    def recorder(name: str):
        def record(module: nn.Module, inputs) -> None:
            sizes.setdefault(name, tuple(inputs[0].shape[-2:]))

        return record

    handles = [conv.register_forward_pre_hook(recorder(name)) for name, conv in _replaceable_convs(model)]
    try:
        with inference(model):
            model(example_input(model, shape))
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """``conv.padding`` as numbers ('same' and 'valid' resolved), as the operators take it."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(total % 2 for total in totals):
            raise ValueError(f"replace_convs: padding='same' of {conv} is asymmetric; the operators pad symmetrically")
        return tuple(total // 2 for total in totals)
    return _pair(conv.padding)
