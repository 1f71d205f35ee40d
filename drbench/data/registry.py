"""Registry of data sets and the one function that loads them by name.

Adding a data set touches one place: decorate its loader with :func:`register_dataset`. A loader is called as
``loader(path, split, seed, **options)`` and returns an :class:`~drbench.data.dataset.ImageDataset`.

>>> from drbench.data import get_dataset
>>> test = get_dataset("synthetic", split="test", seed=0, num_images=100)
>>> test.num_classes, test.image_size
(10, (32, 32))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from drbench.config import register_config_section
from drbench.data.dataset import SPLITS, DatasetError, ImageDataset

Loader = Callable[..., ImageDataset]
DEFAULT_DATASET = "synthetic"


class DataSettings(BaseModel):
    """``[data]`` in drbench.toml: the data set that ``drbench train`` and the accuracy metric use by default."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    dataset: str = Field(DEFAULT_DATASET, description="data set name (drbench list datasets)")
    data_path: str | None = Field(None, description="folder of a data set read from disk (CIFAR, ImageFolder)")


register_config_section("data", DataSettings)


@dataclass(frozen=True)
class DatasetSpec:
    """What the registry knows of one data set: ``needs_path`` marks those read from disk."""

    name: str
    loader: Loader
    description: str
    needs_path: bool = False
    options: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str, description: str, *, needs_path: bool = False, options: tuple[str, ...] = ()
) -> Callable[[Loader], Loader]:
    """Register ``loader(path, split, seed, **options)`` under ``name``."""

    def decorator(loader: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"data set {name!r} is already registered")
        _REGISTRY[name] = DatasetSpec(name, loader, description, needs_path, tuple(options))
        return loader

    return decorator


def list_datasets() -> list[str]:
    """Names of the registered data sets, the embedded default first."""
    return list(_REGISTRY)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` registered under ``name``; a :class:`DatasetError` listing the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DatasetError(f"unknown data set {name!r}; expected one of: {', '.join(_REGISTRY)}") from None


def get_dataset(
    name: str,
    data_path: str | Path | None = None,
    split: str = "train",
    seed: int = 0,
    *,
    limit: int | None = None,
    **options,
) -> ImageDataset:
    """Load split ``split`` ("train" or "test", the held-out split) of data set ``name``.

    ``data_path`` is the folder of data sets read from disk (ignored by the embedded ones); ``seed`` fixes
    whatever the loader draws at random (the synthetic images, a held-out split). ``limit`` keeps the first
    ``limit`` images; a data set that generates its images (one with a ``num_images`` option) makes only those.
    Nothing is ever downloaded. Results are cached, so a suite that trains several models reads its data once.
    """
    spec = get_dataset_spec(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    unknown = set(options) - set(spec.options)
    if unknown:
        takes = ", ".join(spec.options) or "no options"
        raise DatasetError(f"data set {name!r} does not take {', '.join(sorted(unknown))}; it takes {takes}")
    if spec.needs_path:
        if data_path is None:
            raise DatasetError(f"data set {name!r} is read from disk: give its folder (--data PATH)")
        data_path = Path(data_path).expanduser().resolve()
    else:
        data_path = None
    if limit is not None and "num_images" in spec.options:
        options["num_images"] = min(limit, options.get("num_images") or limit)
    return _load(spec, data_path, split, seed, tuple(sorted(options.items()))).take(limit)


@lru_cache(maxsize=4)
def _load(spec: DatasetSpec, path: Path | None, split: str, seed: int, options: tuple) -> ImageDataset:
    return spec.loader(path, split, seed, **dict(options))
