"""pytest hooks shared by the tests and the docstring examples (``--doctest-modules``, see pyproject.toml).

Docstring examples run in a fresh working folder that looks like a user's: the shipped ``suites/`` and a results
store of the quick suite (``results/quick/``) measured at two commits, so that examples show real calls on real
files. An example that names one of :data:`EXAMPLE_INPUTS` finds it there too, made for that example only.
"""

from __future__ import annotations

import importlib.util
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent
EXAMPLE_COMMITS = ("1a2b3c4d" * 5, "5e6f7a8b" * 5)
"""The commits of the example store, oldest first."""
TRITON_EXAMPLE = 'impl="triton"'
"""What marks an example that runs the Triton kernel: on CPU tensors where torch sees no GPU (in Triton's
interpreter), and not at all where triton is not installed."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the docstring examples that run the Triton kernel where triton is not installed (an optional
    dependency)."""
    if importlib.util.find_spec("triton") is not None:
        return
    no_triton = pytest.mark.skip(reason="the example needs triton")
    for item in items:
        if isinstance(item, pytest.DoctestItem) and TRITON_EXAMPLE in _example_source(item):
            item.add_marker(no_triton)


def _example_source(item: pytest.DoctestItem) -> str:
    return "".join(example.source for example in item.dtest.examples)


@pytest.fixture(autouse=True)
def _example_workspace(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For docstring examples only: work in ``tmp_path`` holding ``suites/``, ``results/quick/`` and the
    :data:`EXAMPLE_INPUTS` that the item's examples name; run the Triton kernel in its interpreter without a GPU."""
    if not isinstance(request.node, pytest.DoctestItem):
        return
    shutil.copytree(ROOT / "suites", tmp_path / "suites")
    monkeypatch.chdir(tmp_path)
    _write_example_store(tmp_path / "results" / "quick")
    source = _example_source(request.node)
    for name, write in EXAMPLE_INPUTS.items():
        if f'"{name}"' in source:
            write(tmp_path / name, request)
    if TRITON_EXAMPLE in source and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at each launch (drbench.ops.region_conv_triton)


@pytest.fixture(scope="session")
def _example_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint as ``drbench train shufflenetv2 --width 0.5 --op drconv --regions 4 --epochs 1 --batch-size 16
    --train-images 32 --test-images 8 --threads 1 --checkpoint model.pt`` writes it: trained once per session, and
    only when an example names it. One thread: a model this small gains nothing from more, and on a busy machine
    torch's threads wait on each other (30 s instead of 1 s on a loaded 2-core VM)."""
    from drbench.checkpoint import Checkpoint
    from drbench.data import get_dataset
    from drbench.measure.accuracy import TrainRecipe, model_config_for, train
    from drbench.measure.timing import fixed_threads
    from drbench.models import create_model

    source = {"name": "synthetic", "data_path": None, "seed": 0}
    train_set = get_dataset(split="train", limit=32, **source)
    test_set = get_dataset(split="test", limit=8, **source)
    config = model_config_for("shufflenetv2", train_set, width=0.5, op="drconv", regions=4)
    with fixed_threads(1):
        trained = train(lambda: create_model(**config), train_set, test_set, TrainRecipe(epochs=1, batch_size=16))
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    return Checkpoint(config, trained.model.state_dict(), trained.normalization, source,
                      trained.result.to_dict()).save(path)


def _copy_example_checkpoint(path: Path, request: pytest.FixtureRequest) -> None:
    shutil.copy(request.getfixturevalue("_example_checkpoint"), path)


def _write_cifar10(folder: Path, request: pytest.FixtureRequest) -> None:
    """CIFAR-10's python version: its files and class names, two images in each batch."""
    from drbench.data.cifar import CIFAR10, CIFAR_IMAGE

    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batch = {b"data": np.zeros((2, np.prod(CIFAR_IMAGE)), np.uint8), CIFAR10.label_key: [0, 1]}
    contents = {CIFAR10.meta_file: {CIFAR10.names_key: [name.encode() for name in names]},
                **{file: batch for files in CIFAR10.files.values() for file in files}}
    for file, content in contents.items():
        with open(folder / file, "wb") as handle:  # protocol 2, as the originals (written by Python 2's cPickle)
            pickle.dump(content, handle, protocol=2)


def _write_flowers(folder: Path, request: pytest.FixtureRequest) -> None:
    """An image folder of the five classes of TensorFlow's flowers data set, one photo-sized image each."""
    for index, name in enumerate(["daisy", "dandelion", "roses", "sunflowers", "tulips"]):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (320, 240), (50 * index, 120, 80)).save(folder / name / "0.jpg")


EXAMPLE_INPUTS = {
    "model.pt": _copy_example_checkpoint,
    "data/cifar-10-batches-py": _write_cifar10,
    "data/flowers": _write_flowers,
}
"""A path that a docstring example names (in double quotes) -> what writes it there, given the path and the
item's fixture request."""


def _write_example_store(folder: Path) -> None:
    """One run file per commit: every cell of suites/quick.yaml with MACs, params and latency samples."""
    from drbench.record import SCHEMA_VERSION
    from drbench.results import RunWriter
    from drbench.suite import load_suite

    suite = load_suite("suites/quick.yaml")
    for run, commit in enumerate(EXAMPLE_COMMITS):
        started = f"2026-01-0{run + 1}T00:00:00+00:00"
        with RunWriter(folder / f"run-{run}.jsonl") as writer:
            for index, cell in enumerate(cell.with_device("cpu") for cell in suite.cells):
                median = 0.002 * (index + 1)
                samples = [median * (1 + 0.01 * (k % 5 - 2)) for k in range(20)]
                writer.append({
                    "schema": SCHEMA_VERSION, "suite": suite.name, "run_id": f"run-{run}", "config": cell.config(),
                    "config_hash": cell.config_hash(), "status": "ok",
                    "metrics": {"macs": {"value": 1_000_000 * (index + 1)}, "params": {"value": 10_000 * (index + 1)},
                                "latency": {"value": median, "samples": samples, "median_s": median,
                                            "iqr_s": median * 0.02, "noisy": False}},
                    "env": {"git_commit": commit, "git_dirty": False, "machine": "example", "threads": 1,
                            "device": "cpu", "device_name": "Example CPU", "torch_version": "2.13.0+cpu",
                            "time": started},
                    "started": started, "duration_s": 1.0,
                })
