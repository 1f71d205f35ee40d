"""CIFAR-10 and CIFAR-100 from their standard "python version" folders, read without torchvision.

``--data PATH`` names either the extracted folder itself (``cifar-10-batches-py`` / ``cifar-100-python``) or a
folder that contains it. The batches are pickled dicts of numpy arrays; they are read with an unpickler that admits
only numpy arrays and builtins, so a tampered file cannot run code. Nothing is downloaded: a missing or malformed
folder is a :class:`~drbench.data.dataset.DatasetError` naming the path and what was expected.

>>> from drbench.data import get_dataset
>>> train = get_dataset("cifar10", "data/cifar-10-batches-py", split="train")
>>> train.classes[:3], train.image_size
(('airplane', 'automobile', 'bird'), (32, 32))
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from drbench.data.dataset import DatasetError, ImageDataset
from drbench.data.registry import register_dataset


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and under which keys."""

    name: str
    folder: str
    files: dict[str, tuple[str, ...]]  # split -> batch files
    meta_file: str
    label_key: bytes
    names_key: bytes


CIFAR10 = CifarLayout(
    "cifar10",
    "cifar-10-batches-py",
    {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "batches.meta",
    b"labels",
    b"label_names",
)
CIFAR100 = CifarLayout(
    "cifar100",
    "cifar-100-python",
    {"train": ("train",), "test": ("test",)},
    "meta",
    b"fine_labels",
    b"fine_label_names",
)
CIFAR_IMAGE = (3, 32, 32)


@register_dataset("cifar10", "CIFAR-10 (10 classes, 32x32) from its python-pickle folder", needs_path=True)
def load_cifar10(path: Path, split: str, seed: int) -> ImageDataset:
    return load_cifar(CIFAR10, path, split)


@register_dataset("cifar100", "CIFAR-100 (100 fine classes, 32x32) from its python-pickle folder", needs_path=True)
def load_cifar100(path: Path, split: str, seed: int) -> ImageDataset:
    return load_cifar(CIFAR100, path, split)


def load_cifar(layout: CifarLayout, path: Path, split: str) -> ImageDataset:
    """Read split ``split`` of ``layout`` from ``path`` (the extracted folder or its parent)."""
    folder = _find_folder(layout, path)
    meta = _read_pickle(folder / layout.meta_file)
    classes = tuple(name.decode() for name in _field(meta, layout.names_key, folder / layout.meta_file))
    images, labels = [], []
    for file_name in layout.files[split]:
        file = folder / file_name
        batch = _read_pickle(file)
        data = np.asarray(_field(batch, b"data", file))
        batch_labels = np.asarray(_field(batch, layout.label_key, file))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != np.prod(CIFAR_IMAGE):
            raise DatasetError(f"{file}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
        if batch_labels.shape != (data.shape[0],):
            raise DatasetError(
                f"{file}: expected {data.shape[0]} labels under {layout.label_key!r}, got {batch_labels.shape}"
            )
        images.append(torch.from_numpy(data.reshape(-1, *CIFAR_IMAGE).copy()))
        labels.append(torch.from_numpy(batch_labels.astype(np.int64)))
    try:
        return ImageDataset(layout.name, split, torch.cat(images), torch.cat(labels), classes, hflip=True)
    except DatasetError as error:
        raise DatasetError(f"{folder}: {error}") from None


def _find_folder(layout: CifarLayout, path: Path) -> Path:
    for candidate in (path, path / layout.folder):
        if (candidate / layout.meta_file).is_file():
            return candidate
    expected = ", ".join((layout.meta_file, *layout.files["train"], *layout.files["test"]))
    raise DatasetError(
        f"{layout.name} not found at {path}: expected the python version's files ({expected}) "
        f"in that folder or in {path / layout.folder}"
    )


class _ArraysOnly(pickle.Unpickler):
    """Unpickles builtins and numpy arrays; refuses every other global, which is how pickles run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes, as Python 3 writes them with protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR files hold only numpy arrays")
        return super().find_class(module, name)


def _read_pickle(file: Path) -> dict:
    if not file.is_file():
        raise DatasetError(f"{file}: file not found (a CIFAR folder needs it)")
    try:
        with file.open("rb") as handle:
            content = _ArraysOnly(handle, encoding="bytes").load()
    except Exception as error:  # a truncated or foreign file fails in many ways: say which file
        raise DatasetError(f"{file}: not a readable CIFAR pickle ({type(error).__name__}: {error})") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{file}: expected a pickled dict, got {type(content).__name__}")
    return content


def _field(content: dict, key: bytes, file: Path):
    try:
        return content[key]
    except KeyError:
        found = ", ".join(repr(k) for k in content)
        raise DatasetError(f"{file}: missing key {key!r} (found: {found})") from None
