"""pytest hooks shared by the tests and the docstring examples (``--doctest-modules``, see pyproject.toml)."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the docstring examples that put tensors on a GPU where torch sees none (they run on CUDA machines)."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="the example needs a CUDA device")
    for item in items:
        if isinstance(item, pytest.DoctestItem) and any('device="cuda"' in example.source
                                                         for example in item.dtest.examples):
            item.add_marker(no_gpu)
