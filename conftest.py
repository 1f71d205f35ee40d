"""pytest hooks shared by the tests and the docstring examples (``--doctest-modules``, see pyproject.toml).

Docstring examples run in a fresh working folder that looks like a user's: the shipped ``suites/`` and a results
store of the quick suite (``results/quick/``) measured at two commits, so that examples show real calls on real
files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent
EXAMPLE_COMMITS = ("1a2b3c4d" * 5, "5e6f7a8b" * 5)
"""The commits of the example store, oldest first."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the docstring examples that put tensors on a GPU where torch sees none (they run on CUDA machines)."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="the example needs a CUDA device")
    for item in items:
        if isinstance(item, pytest.DoctestItem) and any('device="cuda"' in example.source
                                                         for example in item.dtest.examples):
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _example_workspace(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For docstring examples only: work in ``tmp_path`` holding ``suites/`` and ``results/quick/``."""
    if not isinstance(request.node, pytest.DoctestItem):
        return
    shutil.copytree(ROOT / "suites", tmp_path / "suites")
    monkeypatch.chdir(tmp_path)
    _write_example_store(tmp_path / "results" / "quick")


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
