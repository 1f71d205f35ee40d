"""Registry of model families and the factory that builds them with any operator (like timm's).

>>> from drbench.models import create_model, list_models
>>> list_models()
['shufflenetv2', 'mobilenetv2', 'mobilenetv1', 'mobilefacenet']
>>> model = create_model("shufflenetv2", width=0.5, op="drconv", regions=8)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch.nn as nn

from drbench.models.builder import PLACEMENTS, LayerBuilder, Placement
from drbench.models.probe import image_shape
from drbench.ops import get_op

ModelClass = TypeVar("ModelClass", bound=type)


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of one model family.

    ``widths`` are the published width multipliers; with ``any_width`` every width between the smallest and the
    largest is accepted too. ``placements`` (family-specific ones plus the shared ``all`` and ``pointwise``) map
    names to the convolutions an operator replaces; ``"default"`` is the paper's choice.
    ``num_classes`` and ``input_size`` are the defaults of :func:`create_model`.
    """

    name: str
    builder: Callable[..., nn.Module]
    description: str
    widths: tuple[float, ...]
    placements: dict[str, Placement]
    any_width: bool = False
    num_classes: int = 1000
    input_size: tuple[int, int] = (224, 224)

    def check_width(self, width: float) -> None:
        low, high = min(self.widths), max(self.widths)
        if width in self.widths or (self.any_width and low <= width <= high):
            return
        allowed = f"any width in [{low}, {high}]" if self.any_width else ", ".join(map(str, self.widths))
        raise ValueError(f"{self.name} has no width {width}; expected {allowed}")

    def placement(self, name: str) -> Placement:
        try:
            return self.placements[name]
        except KeyError:
            raise ValueError(
                f"{self.name} has no placement {name!r}; expected one of: {', '.join(self.placements)}"
            ) from None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    description: str,
    *,
    widths: tuple[float, ...],
    placements: dict[str, Placement],
    any_width: bool = False,
    num_classes: int = 1000,
    input_size: tuple[int, int] = (224, 224),
) -> Callable[[ModelClass], ModelClass]:
    """Class decorator: register a model family whose constructor takes
    ``(width=, num_classes=, small_input=, layers=LayerBuilder)``; ``placements`` must include ``"default"``."""

    def decorator(builder: ModelClass) -> ModelClass:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        if "default" not in placements:
            raise ValueError(f"model {name!r} needs a 'default' placement")
        _REGISTRY[name] = ModelSpec(
            name, builder, description, widths, {**placements, **PLACEMENTS}, any_width, num_classes, input_size
        )
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of the registered model families, in registration order."""
    return list(_REGISTRY)


def get_model(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name``; a ``ValueError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(_REGISTRY)}") from None


def create_model(
    name: str,
    width: float = 1.0,
    op: str = "conv",
    num_classes: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    placement: str = "default",
    small_input: bool = False,
    **op_kwargs,
) -> nn.Module:
    """Build model ``name`` at ``width`` with operator ``op`` at the convolutions ``placement`` selects.

    ``input_size`` (an int or (H, W)) is the size the model will see: operators such as ``local`` are built for
    it; it defaults to the family's (224; 112 for MobileFaceNet). ``num_classes`` defaults to the family's output
    size (1000 ImageNet classes; MobileFaceNet's 128-d embedding). ``small_input`` swaps in a stem for 32x32
    images. ``op_kwargs`` go to every replaced operator.

    >>> model = create_model("mobilenetv2", width=0.5, op="condconv", experts=4, num_classes=10,
    ...                      input_size=32, small_input=True)
    """
    spec = get_model(name)
    spec.check_width(width)
    selection = spec.placement(placement)
    get_op(op)
    input_size = spec.input_size if input_size is None else input_size
    if not isinstance(input_size, int) and len(input_size) != 2:
        raise ValueError(f"input_size must be an int or (H, W), got {input_size!r}")
    _, *size = image_shape(input_size)
    classes = spec.num_classes if num_classes is None else num_classes
    if classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    layers = LayerBuilder(op, size, selection, context=f"{name} placement {placement!r}: ", **op_kwargs)
    return spec.builder(width=width, num_classes=classes, small_input=small_input, layers=layers)
