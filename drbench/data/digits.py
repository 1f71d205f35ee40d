"""Scikit-learn's bundled 8x8 handwritten digits (``load_digits``: 1,797 images, 10 classes), upsampled.

An optional real data set that ships inside scikit-learn's wheel, so it needs no download; it is available when
scikit-learn is installed (``pip install scikit-learn``). The 8x8 grey images (values 0..16) are scaled to
0..255, upsampled bilinearly to ``image_size`` (default 32) and repeated over three channels so that the RGB
models take them. The held-out split is a seeded 20% of each class. Digits are not mirror-symmetric: no
horizontal flips.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from drbench.data.dataset import DatasetError, ImageDataset
from drbench.data.registry import register_dataset

HELD_OUT_FRACTION = 0.2


@register_dataset(
    "digits", "scikit-learn's 8x8 digits (10 classes, 1,797 images) upsampled; needs scikit-learn",
    options=("image_size",),
)
def load_digits(path: Path | None, split: str, seed: int, image_size: int = 32) -> ImageDataset:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DatasetError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    if image_size < 8:
        raise DatasetError(f"digits: image_size must be at least 8 pixels, got {image_size}")
    bunch = sklearn_digits()
    grey = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) * (255 / 16)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    chosen = _held_out_mask(labels, seed) == (split == "test")
    upsampled = F.interpolate(grey[chosen], size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = upsampled.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    classes = tuple(str(name) for name in bunch.target_names)
    return ImageDataset("digits", split, images, labels[chosen], classes, hflip=False)


def _held_out_mask(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """True for a seeded ``HELD_OUT_FRACTION`` of each class."""
    generator = torch.Generator().manual_seed(seed)
    held_out = torch.zeros_like(labels, dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        shuffled = members[torch.randperm(len(members), generator=generator)]
        held_out[shuffled[: round(HELD_OUT_FRACTION * len(members))]] = True
    return held_out
