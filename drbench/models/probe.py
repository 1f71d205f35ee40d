"""Running a model once on an example input, as complexity counting and operator swapping both need.

>>> image_shape(32), image_shape((112, 96)), image_shape((1, 28, 28))
((3, 32, 32), (3, 112, 96), (1, 28, 28))
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


def image_shape(input_size: int | tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) from an int (square, 3 channels), (H, W) (3 channels) or (C, H, W); ``ValueError`` otherwise."""
    if isinstance(input_size, int):
        shape = (3, input_size, input_size)
    elif len(input_size) == 2:
        shape = (3, *input_size)
    else:
        shape = tuple(input_size)
    if len(shape) != 3 or not all(isinstance(size, int) and size >= 1 for size in shape):
        raise ValueError(f"input_size must be a positive int, (H, W) or (C, H, W), got {input_size!r}")
    return shape


def example_input(model: nn.Module, shape: tuple[int, int, int], batch_size: int = 1) -> torch.Tensor:
    """A random batch on the device and in the dtype of ``model``'s parameters."""
    reference = next(model.parameters(), None)
    if reference is None:
        return torch.randn(batch_size, *shape)
    return torch.randn(batch_size, *shape, device=reference.device, dtype=reference.dtype)


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (BatchNorm accepts a batch of one) without gradients; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
