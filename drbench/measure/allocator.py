"""Keep freed memory in the process while timing, so that a latency does not include the kernel's page faults.

glibc's malloc serves a large block (above a threshold that adapts between 128 KB and 32 MB) with a fresh ``mmap``
and gives it back on free, and gives the top of its heap back to the kernel past a trim threshold. A tensor of a
few MB made and freed every call then costs a page fault and the kernel's zeroing for each of its pages, every
call, and whether a run pays it depends on what ran before. Measured on the 2-core development VM: ``nn.Conv2d`` 1x1
(B=32, C=O=116, 28x28, 2 threads, inference) took 10.4 ms with 5,600 page faults per call, and 3.4 ms with none;
timed in turns with a DRConv layer, it paid them on every call, which read DRConv as 0.7x conv where it is 2x. On a
virtual machine a fault's cost also moves with the host. That cost is the allocator's and the host's, not the
operator's (PyTorch's CPU performance guide recommends jemalloc or tcmalloc for the same reason); latency is
measured with freed memory kept: a fixed mmap threshold of 32 MB (glibc's largest) and a trim threshold of 1 GB.
Larger blocks still come from ``mmap``. Where the C library is not glibc, nothing changes, and records say so.

>>> hold_freed_memory() in (HELD, UNCHANGED)
True
"""

from __future__ import annotations

import ctypes
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20
"""Bytes from which a block gets its own mapping: glibc's largest allowed value (HEAP_MAX_SIZE / 2 on 64 bits)."""
TRIM_THRESHOLD = 1 << 30
"""Free bytes at the top of the heap before glibc gives them back to the kernel."""

HELD = f"glibc malloc, freed memory kept (mmap threshold {MMAP_THRESHOLD >> 20} MB, trim threshold " \
       f"{TRIM_THRESHOLD >> 30} GB)"
UNCHANGED = "the C library's defaults (not glibc: its malloc settings cannot be set)"


@functools.cache
def hold_freed_memory() -> str:
    """Set glibc's malloc to keep freed memory (once per process; later calls return the first answer): what the
    process's allocator now does, :data:`HELD` or :data:`UNCHANGED`, as result records store it."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library to load, or one without mallopt (macOS, musl)
        return UNCHANGED
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a fixed mmap threshold also turns off its adaptation
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
        return HELD
    return UNCHANGED
