"""Image classification data sets for short-schedule training, loaded by name; nothing is ever downloaded.

- ``synthetic`` (the default): generated in a second from a seed, no files (see :mod:`drbench.data.synthetic`);
- ``cifar10`` / ``cifar100``: their python-pickle folders on disk;
- ``digits``: scikit-learn's bundled 8x8 digits, upsampled (when scikit-learn is installed);
- ``imagefolder``: class sub-folders of images (Pillow).

>>> from drbench.data import get_dataset, list_datasets
>>> list_datasets()
['synthetic', 'cifar10', 'cifar100', 'digits', 'imagefolder']
>>> train = get_dataset("synthetic", split="train", seed=0, num_images=50)
>>> len(train), train.num_classes
(50, 10)
"""

from drbench.data import synthetic  # noqa: F401,I001  (registration order is the listing order: default first)
from drbench.data import cifar, digits, imagefolder  # noqa: F401
from drbench.data.dataset import SPLITS, DatasetError, ImageDataset, Normalization
from drbench.data.registry import (
    DEFAULT_DATASET,
    DatasetSpec,
    DataSettings,
    get_dataset,
    get_dataset_spec,
    list_datasets,
    register_dataset,
)

__all__ = [
    "DEFAULT_DATASET",
    "SPLITS",
    "DatasetError",
    "DataSettings",
    "DatasetSpec",
    "ImageDataset",
    "Normalization",
    "get_dataset",
    "get_dataset_spec",
    "list_datasets",
    "register_dataset",
]
