"""ImageFolder-style directories of images (one sub-folder per class), decoded with Pillow.

Two layouts are accepted under ``--data PATH``:

- ``PATH/train/<class>/*.png`` and ``PATH/val/<class>/...`` (or ``PATH/test/<class>/...``): the splits as given;
- ``PATH/<class>/*.png``: no split on disk; the held-out split is every fifth image of each class in file-name
  order (deterministic, independent of the seed).

Classes are the sorted sub-folder names of the training folder. Each image is converted to RGB, centre-cropped
to a square and resized to ``image_size`` (default 32) so that it fits the small-input models.

>>> from drbench.data import get_dataset
>>> train = get_dataset("imagefolder", "data/flowers", image_size=64)
>>> train.classes, train.image_size
(('daisy', 'dandelion', 'roses', 'sunflowers', 'tulips'), (64, 64))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from drbench.data.dataset import DatasetError, ImageDataset
from drbench.data.registry import register_dataset

IMAGE_SUFFIXES = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp"})
HELD_OUT_EVERY = 5
TEST_FOLDERS = ("val", "test")


@register_dataset(
    "imagefolder", "a folder of class sub-folders of images (Pillow), resized to image_size", needs_path=True,
    options=("image_size",),
)
def load_imagefolder(path: Path, split: str, seed: int, image_size: int = 32) -> ImageDataset:
    if image_size < 1:
        raise DatasetError(f"imagefolder: image_size must be a positive number of pixels, got {image_size}")
    if not path.is_dir():
        raise DatasetError(f"{path}: no such folder (expected class sub-folders of images)")
    train_folder = path / "train"
    test_folder = next((path / name for name in TEST_FOLDERS if (path / name).is_dir()), None)
    if train_folder.is_dir() and test_folder is not None:
        classes = _class_folders(train_folder)
        files = _image_files(train_folder if split == "train" else test_folder, classes)
    else:
        classes = _class_folders(path)
        files = _split_every_fifth(_image_files(path, classes), split)
    if not files:
        raise DatasetError(f"{path}: the {split} split has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    images = torch.stack([_decode(file, image_size) for file, _ in files])
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageDataset(f"imagefolder:{path.name}", split, images, labels, classes, hflip=True)


def _class_folders(folder: Path) -> tuple[str, ...]:
    classes = tuple(sorted(entry.name for entry in folder.iterdir() if entry.is_dir()))
    if not classes:
        raise DatasetError(f"{folder}: expected one sub-folder per class, found none")
    return classes


def _image_files(folder: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    """(file, label) pairs, in class then file-name order; a class folder the training split lacks is an error."""
    present = {entry.name for entry in folder.iterdir() if entry.is_dir()}
    unknown = present - set(classes)
    if unknown:
        raise DatasetError(f"{folder}: class folders {', '.join(sorted(unknown))} are not in the training split")
    return [
        (file, label)
        for label, name in enumerate(classes)
        if name in present
        for file in sorted((folder / name).iterdir())
        if file.suffix.lower() in IMAGE_SUFFIXES
    ]


def _split_every_fifth(files: list[tuple[Path, int]], split: str) -> list[tuple[Path, int]]:
    """Hold out every fifth file of each class for "test"; the rest is "train"."""
    position_in_class: dict[int, int] = {}
    chosen = []
    for file, label in files:
        position = position_in_class[label] = position_in_class.get(label, -1) + 1
        if (position % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == (split == "test"):
            chosen.append((file, label))
    return chosen


def _decode(file: Path, image_size: int) -> torch.Tensor:
    try:
        with Image.open(file) as image:
            square = ImageOps.fit(image.convert("RGB"), (image_size, image_size), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError) as error:
        raise DatasetError(f"{file}: not a readable image ({error})") from None
    return torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1)
