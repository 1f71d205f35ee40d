"""Data sets: the embedded synthetic default, CIFAR pickles, ImageFolder, digits, and their errors.

Every on-disk format is exercised with tiny files written here in the real format; nothing is downloaded.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from drbench.data import DatasetError, ImageDataset, Normalization, get_dataset, list_datasets
from drbench.data import synthetic


def test_registry_lists_the_embedded_default_first():
    assert list_datasets()[0] == "synthetic"
    assert {"cifar10", "cifar100", "imagefolder", "digits"} <= set(list_datasets())


# --- synthetic ----------------------------------------------------------------------------------------------------


def test_synthetic_is_a_pure_function_of_the_seed():
    first, again, other = synthetic.generate(60, seed=3), synthetic.generate(60, seed=3), synthetic.generate(60, 4)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)


def test_synthetic_small_sets_are_prefixes_of_large_ones():
    large = synthetic.generate(510, seed=2)  # two chunks
    for count in (7, 505):
        small = synthetic.generate(count, seed=2)
        assert torch.equal(small.images, large.images[:count]) and torch.equal(small.labels, large.labels[:count])
    assert torch.bincount(large.labels[:500], minlength=10).tolist() == [50] * 10  # balanced within a chunk


def test_synthetic_splits_are_distinct_and_well_formed():
    train = get_dataset("synthetic", split="train", seed=0, limit=100)
    test = get_dataset("synthetic", split="test", seed=0, limit=100)
    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 100 and not torch.equal(train.images, test.images)
    assert train.num_classes == 10 and train.hflip


def test_synthetic_default_sizes():
    assert synthetic.TRAIN_IMAGES > synthetic.TEST_IMAGES >= 1000


def test_synthetic_label_is_carried_by_the_object_texture():
    """Horizontal stripes vary down the rows, vertical ones across the columns: the mean gradient shows the label
    even though the clutter holds both orientations."""
    data = synthetic.generate(400, seed=1)
    pixels = data.images.float().mean(dim=1)
    down = (pixels[:, 1:, :] - pixels[:, :-1, :]).abs().mean(dim=(1, 2))
    across = (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().mean(dim=(1, 2))
    vertical = (data.labels % 2).bool()
    assert (down > across)[~vertical].float().mean() > 0.8
    assert (across > down)[vertical].float().mean() > 0.8


def test_synthetic_shapes_overlap_little():
    """Any two of the five shapes, centred alike, share less than 85% of their area (intersection over union)."""
    grid = torch.linspace(-1.2, 1.2, 121)
    v, u = torch.meshgrid(grid, grid, indexing="ij")
    masks = {name: synthetic._shape_mask(name, u, v) for name in synthetic.SHAPES}
    for first in synthetic.SHAPES:
        for second in synthetic.SHAPES:
            if first < second:
                union = (masks[first] | masks[second]).sum()
                assert (masks[first] & masks[second]).sum() / union < 0.85, (first, second)


# --- errors of the registry ----------------------------------------------------------------------------------------


def test_unknown_dataset_lists_known_names():
    with pytest.raises(DatasetError, match="unknown data set 'imagenet'.*synthetic"):
        get_dataset("imagenet")


def test_unknown_split_and_option_are_errors():
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        get_dataset("synthetic", split="val", num_images=10)
    with pytest.raises(DatasetError, match="does not take colour.*num_images"):
        get_dataset("synthetic", colour=True)


def test_on_disk_dataset_without_path_says_so():
    with pytest.raises(DatasetError, match="cifar10.*--data PATH"):
        get_dataset("cifar10")


def test_image_dataset_validates_its_tensors():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(DatasetError, match="uint8"):
        ImageDataset("x", "train", images.float(), torch.zeros(2, dtype=torch.long), ("a",))
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 1\)"):
        ImageDataset("x", "train", images, torch.tensor([0, 1]), ("a",))
    with pytest.raises(DatasetError, match="labels must be int64 of shape"):
        ImageDataset("x", "train", images, torch.zeros(3, dtype=torch.long), ("a",))


def test_take_keeps_the_first_images():
    data = synthetic.generate(30, seed=0)
    head = data.take(7)
    assert len(head) == 7 and torch.equal(head.images, data.images[:7])
    assert data.take(None) is data and data.take(100) is data


def test_normalization_matches_float_statistics():
    data = synthetic.generate(50, seed=0)
    stats = Normalization.of(data)
    pixels = data.images.double() / 255
    assert stats.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert stats.std == pytest.approx(pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-9)
    normalized = stats(data.images)
    assert normalized.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (normalized.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3


# --- CIFAR -----------------------------------------------------------------------------------------------------------


def _cifar_batch(path, count, label_key, num_classes, offset):
    data = (np.arange(count * 3072, dtype=np.int64).reshape(count, 3072) + offset) % 251
    labels = [(offset + i) % num_classes for i in range(count)]
    with open(path, "wb") as handle:  # protocol 2, as the originals (written by Python 2's cPickle)
        pickle.dump({b"data": data.astype(np.uint8), label_key: labels, b"batch_label": b"x"}, handle, protocol=2)
    return data.astype(np.uint8), labels


def _cifar10_folder(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "batches.meta", "wb") as handle:
        names = [f"class{i}".encode() for i in range(10)]
        pickle.dump({b"label_names": names, b"num_cases_per_batch": 2}, handle, protocol=2)
    train = [_cifar_batch(folder / f"data_batch_{i}", 2, b"labels", 10, offset=i) for i in range(1, 6)]
    test = _cifar_batch(folder / "test_batch", 3, b"labels", 10, offset=7)
    return folder, train, test


def test_cifar10_reads_the_python_pickle_folder(tmp_path):
    folder, train_batches, (test_data, test_labels) = _cifar10_folder(tmp_path)
    train = get_dataset("cifar10", tmp_path, split="train")  # the parent folder works too
    test = get_dataset("cifar10", folder, split="test")
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    first_data, first_labels = train_batches[0]
    # CIFAR rows are 1024 red values, then green, then blue, each row-major
    assert torch.equal(train.images[0, 0].flatten(), torch.from_numpy(first_data[0, :1024]))
    assert torch.equal(train.images[0, 2].flatten(), torch.from_numpy(first_data[0, 2048:]))
    assert train.labels[:2].tolist() == first_labels and test.labels.tolist() == test_labels
    assert train.classes[3] == "class3" and train.num_classes == 10
    assert torch.equal(get_dataset("cifar10", folder, split="train", limit=3).images, train.images[:3])


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "meta", "wb") as handle:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": []}, handle)
    _, labels = _cifar_batch(folder / "train", 4, b"fine_labels", 100, offset=97)
    _cifar_batch(folder / "test", 2, b"fine_labels", 100, offset=0)
    train = get_dataset("cifar100", tmp_path, split="train")
    assert train.labels.tolist() == labels == [97, 98, 99, 0] and train.num_classes == 100


def test_cifar_missing_folder_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match=rf"cifar10 not found at {tmp_path}.*batches.meta"):
        get_dataset("cifar10", tmp_path)


def test_cifar_missing_batch_names_the_file(tmp_path):
    folder, _, _ = _cifar10_folder(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"data_batch_3: file not found"):
        get_dataset("cifar10", folder, split="train")


def test_cifar_malformed_files_name_the_file_and_the_problem(tmp_path):
    folder, _, _ = _cifar10_folder(tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="test_batch: not a readable CIFAR pickle"):
        get_dataset("cifar10", folder, split="test")
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(DatasetError, match=r"test_batch: b'data' must be uint8 of shape \(N, 3072\)"):
        get_dataset("cifar10", folder, split="test", seed=1)  # another seed: not served from the cache
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, handle)
    with pytest.raises(DatasetError, match=r"test_batch: missing key b'labels'"):
        get_dataset("cifar10", folder, split="test", seed=2)


class _RunsCode:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


def test_cifar_pickles_cannot_run_code(tmp_path, capsys):
    folder, _, _ = _cifar10_folder(tmp_path)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": _RunsCode(), b"labels": []}, handle)
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        get_dataset("cifar10", folder, split="test")
    assert "ran code" not in capsys.readouterr().out


# --- ImageFolder --------------------------------------------------------------------------------------------------


def _write_images(folder, count, colour, size=(40, 20)):
    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", size, colour).save(folder / f"{index:02d}.png")


def test_imagefolder_with_split_folders(tmp_path):
    _write_images(tmp_path / "train" / "cat", 3, (255, 0, 0))
    _write_images(tmp_path / "train" / "dog", 2, (0, 0, 255))
    _write_images(tmp_path / "val" / "dog", 1, (0, 0, 255))
    train = get_dataset("imagefolder", tmp_path, split="train", image_size=16)
    test = get_dataset("imagefolder", tmp_path, split="test", image_size=16)
    assert train.classes == ("cat", "dog") and train.labels.tolist() == [0, 0, 0, 1, 1]
    assert train.images.shape == (5, 3, 16, 16)
    assert train.images[0, :, 8, 8].tolist() == [255, 0, 0]  # decoded as RGB, channels first
    assert test.labels.tolist() == [1] and test.num_classes == 2


def test_imagefolder_without_splits_holds_out_every_fifth_image(tmp_path):
    _write_images(tmp_path / "a", 10, (0, 255, 0))
    _write_images(tmp_path / "b", 5, (9, 9, 9))
    train = get_dataset("imagefolder", tmp_path, split="train")
    test = get_dataset("imagefolder", tmp_path, split="test")
    assert test.labels.tolist() == [0, 0, 1] and len(train) == 12
    assert train.image_size == (32, 32)


def test_imagefolder_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="missing: no such folder"):
        get_dataset("imagefolder", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: expected one sub-folder per class"):
        get_dataset("imagefolder", tmp_path / "empty")
    broken = tmp_path / "broken"
    _write_images(broken / "a", 4, (1, 2, 3))
    (broken / "a" / "02.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"02.png: not a readable image"):
        get_dataset("imagefolder", broken)
    stray = tmp_path / "stray"
    _write_images(stray / "train" / "a", 1, (1, 2, 3))
    _write_images(stray / "val" / "zebra", 1, (1, 2, 3))
    with pytest.raises(DatasetError, match="zebra are not in the training split"):
        get_dataset("imagefolder", stray, split="test")


# --- digits ---------------------------------------------------------------------------------------------------------


def test_digits_are_upsampled_and_split_by_class():
    pytest.importorskip("sklearn")
    train = get_dataset("digits", split="train")
    test = get_dataset("digits", split="test", image_size=16)
    assert len(train) + len(test) == 1797 and 0.18 < len(test) / 1797 < 0.22
    assert train.images.shape[1:] == (3, 32, 32) and test.images.shape[1:] == (3, 16, 16)
    assert torch.equal(train.images[:, 0], train.images[:, 2]) and not train.hflip
    assert set(test.labels.tolist()) == set(range(10))
