"""Peak memory of a forward pass, beyond what was allocated before it (parameters and input excluded).

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated before
  the call. This is the caching allocator's own account: every tensor and every cuDNN/cuBLAS workspace.
- CPU: the CPU allocator keeps no peak statistic, so drbench follows the tensors instead. A
  ``TorchDispatchMode`` sees every ATen operator the forward pass runs (composite operators are decomposed before
  it, so their intermediates are seen too); it adds the bytes of each new storage an operator returns and
  subtracts them when the storage is freed (a ``weakref.finalize`` on the storage). The peak of that running sum
  is the peak of the forward's live tensors. Scratch buffers that a kernel allocates and frees internally (oneDNN
  workspaces, for instance) never appear as tensors and are not counted; the alternative, ``torch.profiler`` with
  ``profile_memory=True``, reports allocations per operator but not their order with the frees, so it cannot give
  a peak without reconstructing the allocator's timeline.

>>> import torch
>>> layer = torch.nn.Conv2d(3, 8, 3, padding=1)
>>> peak = forward_peak_memory(layer, torch.randn(1, 3, 16, 16))
>>> peak.peak_bytes >= 8 * 16 * 16 * 4            # at least the output
True
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA_METHOD = "torch.cuda.max_memory_allocated"
CPU_METHOD = "live tensor storages (TorchDispatchMode)"


@dataclass(frozen=True)
class MemoryMeasurement:
    """Peak bytes allocated during one forward pass beyond the bytes live before it, and how it was measured."""

    peak_bytes: int
    device: str
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


class LiveTensorTracker(TorchDispatchMode):
    """Tracks the bytes of storages created by operators while active; ``peak_bytes`` is the high-water mark."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._track(value.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # identity of the underlying storage, shared by views
        if key in self._tracked:
            return
        size = storage.nbytes()
        self._tracked.add(key)
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live_bytes -= size


def forward_peak_memory(model: nn.Module, example: torch.Tensor) -> MemoryMeasurement:
    """Peak extra memory of ``model(example)`` in eval mode under ``torch.inference_mode`` (see module docstring)."""
    model.eval()
    device = example.device
    with torch.inference_mode():
        if device.type == "cuda":
            return _cuda_peak(model, example)
        tracker = LiveTensorTracker()
        with tracker:
            model(example)
        return MemoryMeasurement(tracker.peak_bytes, str(device), CPU_METHOD)


def _cuda_peak(model: nn.Module, example: torch.Tensor) -> MemoryMeasurement:
    device = example.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    model(example)
    torch.cuda.synchronize(device)
    return MemoryMeasurement(torch.cuda.max_memory_allocated(device) - before, str(device), CUDA_METHOD)
