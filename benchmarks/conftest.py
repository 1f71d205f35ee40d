"""Shared set-up of drbench's pytest-benchmark microbenchmarks.

- ``--bench-device cpu|cuda|auto`` (default auto: CUDA when available) chooses the device; the ``device`` fixture
  holds it. ``--bench-threads N`` fixes torch's thread count (default: torch's own).
- ``timed(fn)`` (a fixture) makes the callable that pytest-benchmark should time: on CUDA it synchronises after the
  call, so each timed call includes the kernels it launched (they run asynchronously), and the timer starts
  after the previous call's kernels have finished.
- Machine info (``pytest_benchmark_update_machine_info``) records torch's version and thread count, CUDA and
  cuDNN versions and the GPU's name: ``--benchmark-compare`` warns when they differ between the saved baseline
  and the current run (pytest-benchmark keeps the git commit itself, as ``commit_info``).

    pytest benchmarks --benchmark-autosave                                       # save a baseline
    pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:10%    # compare with the last one
"""

from __future__ import annotations

from typing import Callable, Iterator

import pytest
import torch

from drbench.measure.timing import fixed_threads


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="device of drbench's microbenchmarks (auto: cuda when available)")
    parser.addoption("--bench-threads", type=int, default=0,
                     help="torch intra-op threads for the microbenchmarks (0: torch's default)")


@pytest.fixture(scope="session", autouse=True)
def bench_threads(pytestconfig: pytest.Config) -> Iterator[int]:
    """Every benchmark runs with ``--bench-threads`` torch threads (recorded in the machine info)."""
    with fixed_threads(pytestconfig.getoption("--bench-threads")) as threads:
        yield threads


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    chosen = pytestconfig.getoption("--bench-device")
    if chosen == "auto":
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
    if chosen == "cuda" and not torch.cuda.is_available():
        pytest.exit("--bench-device cuda: torch sees no CUDA device", returncode=2)
    return torch.device(chosen)


@pytest.fixture(scope="session")
def timed(device: torch.device) -> Callable[[Callable[[], object]], Callable[[], object]]:
    """``timed(fn)``: ``fn`` as pytest-benchmark must time it on ``device`` (see the module docstring)."""

    def wrap(fn: Callable[[], object]) -> Callable[[], object]:
        if device.type != "cuda":
            return fn

        def synchronised() -> None:
            fn()
            torch.cuda.synchronize(device)

        torch.cuda.synchronize(device)
        return synchronised

    return wrap


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    # The commit is not machine info: pytest-benchmark stores it as commit_info, and a value that changes with
    # every commit here would make --benchmark-compare warn that the machines differ.
    machine_info.update(
        torch_version=torch.__version__,
        torch_threads=config.getoption("--bench-threads") or torch.get_num_threads(),
        cuda_version=torch.version.cuda,
        cudnn_version=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        gpu_name=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )
