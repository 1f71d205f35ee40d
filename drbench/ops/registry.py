"""Registry of convolution operators and the factory that builds them from names.

Adding an operator touches one place: decorate its builder with :func:`register_op`.

>>> from drbench.ops import create_conv
>>> layer = create_conv("condconv", 32, 64, 3, padding=1, experts=4)
>>> sorted(list_ops())[:2]
['condconv', 'conv']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

OpBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class OpSpec:
    """What the registry knows of one operator.

    ``needs_input_size`` marks operators (local convolution) whose parameters depend on the spatial size of
    their input: :func:`create_conv` passes ``input_size`` only to those.
    ``options`` names the operator-specific keyword arguments (for suites, ``drbench list ops`` and errors).
    ``model_args`` names keyword arguments that only a model's builder passes (objects of the model, such as a
    unit's shared guide), never a suite or the command line.
    """

    name: str
    builder: OpBuilder
    description: str
    needs_input_size: bool = False
    options: tuple[str, ...] = field(default_factory=tuple)
    model_args: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, OpSpec] = {}


def register_op(
    name: str, description: str, *, needs_input_size: bool = False, options: tuple[str, ...] = (),
    model_args: tuple[str, ...] = (),
) -> Callable[[OpBuilder], OpBuilder]:
    """Register ``builder(in_channels, out_channels, kernel_size, **kwargs)`` under ``name``."""

    def decorator(builder: OpBuilder) -> OpBuilder:
        if name in _REGISTRY:
            raise ValueError(f"operator {name!r} is already registered")
        _REGISTRY[name] = OpSpec(name, builder, description, needs_input_size, tuple(options), tuple(model_args))
        return builder

    return decorator


def list_ops() -> list[str]:
    """Names of the registered operators, in registration order."""
    return list(_REGISTRY)


def get_op(name: str) -> OpSpec:
    """The :class:`OpSpec` registered under ``name``; a ``ValueError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown operator {name!r}; expected one of: {known}") from None


def create_conv(
    op: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    *,
    input_size: tuple[int, int] | None = None,
    **kwargs,
) -> nn.Module:
    """Build operator ``op`` where an ``nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs)`` would go.

    ``input_size`` (H, W) is the spatial size the layer will see; it is required by operators that need it
    (``local``) and ignored by the others, so model builders can always pass it.

    >>> create_conv("conv", 8, 16, 3, padding=1, bias=False)
    Conv2d(8, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    """
    spec = get_op(op)
    if spec.needs_input_size:
        if input_size is None:
            raise ValueError(f"operator {op!r} needs input_size=(H, W), the spatial size of its input")
        kwargs["input_size"] = input_size
    unknown = set(kwargs) - _COMMON_CONV_ARGS - set(spec.options) - set(spec.model_args) - {"input_size"}
    if unknown:
        raise TypeError(
            f"operator {op!r} does not take {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(sorted(_COMMON_CONV_ARGS | set(spec.options)))}"
        )
    return spec.builder(in_channels, out_channels, kernel_size, **kwargs)


_COMMON_CONV_ARGS = frozenset({"stride", "padding", "dilation", "groups", "bias"})
