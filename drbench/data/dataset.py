"""The in-memory image data set every drbench loader returns, and the error they raise on bad input.

Short-schedule training reads small data sets (tens of thousands of images at most), so loaders decode everything
once into one ``uint8`` tensor; batching, augmentation and normalisation then cost a few tensor operations and no
worker processes, which keeps training fast and its data order exactly reproducible.

>>> import torch
>>> data = ImageDataset("toy", "train", torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
...                     classes=("a", "b"))
>>> len(data), data.num_classes, data.image_size
(4, 2, (8, 8))
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A data set that is missing, malformed, or asked for with arguments it does not take."""


@dataclass(frozen=True)
class ImageDataset:
    """One split of an image classification data set, held in memory.

    ``images`` is ``uint8`` (N, C, H, W) and ``labels`` ``int64`` (N,) with values in ``[0, len(classes))``.
    ``hflip`` says whether a horizontal flip keeps an image's label (true for objects, false for digits), so the
    trainer knows which augmentations are label-preserving. Treat the tensors as read-only: loaders cache them.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(
                f"{self.name}: images must be a uint8 tensor (N, C, H, W), "
                f"got {self.images.dtype} of shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise DatasetError(
                f"{self.name}: labels must be int64 of shape ({self.images.shape[0]},), "
                f"got {self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.classes):
            raise DatasetError(
                f"{self.name}: labels must lie in [0, {len(self.classes)}), "
                f"got [{int(self.labels.min())}, {int(self.labels.max())}]"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    def take(self, count: int | None) -> ImageDataset:
        """The first ``count`` images (all of them when ``count`` is None), for quick runs on a subset."""
        if count is None or count >= len(self):
            return self
        if count < 1:
            raise DatasetError(f"{self.name}: asked for {count} images; expected at least 1")
        return replace(self, images=self.images[:count], labels=self.labels[:count])


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation (on a 0..1 scale) that turn ``uint8`` images into model inputs.

    >>> import torch
    >>> data = ImageDataset("toy", "train", torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1),
    ...                     torch.tensor([0, 0]), classes=("a",))
    >>> Normalization.of(data)
    Normalization(mean=(0.5,), std=(0.5,))
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, dataset: ImageDataset) -> Normalization:
        """Exact statistics of ``dataset``, from a 256-bin histogram per channel (no float copy of the images)."""
        values = torch.arange(256, dtype=torch.float64) / 255
        means, stds = [], []
        for channel in range(dataset.channels):
            counts = torch.bincount(dataset.images[:, channel].flatten(), minlength=256).to(torch.float64)
            mean = (counts * values).sum() / counts.sum()
            variance = (counts * (values - mean) ** 2).sum() / counts.sum()
            means.append(float(mean))
            stds.append(max(float(variance.sqrt()), 1e-3))  # a constant channel must not divide by zero
        return cls(tuple(means), tuple(stds))

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``uint8`` (B, C, H, W) images, on any device, as normalised ``dtype`` inputs."""
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=dtype, device=images.device).view(shape)
        return (images.to(dtype) / 255 - mean) / std

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}
