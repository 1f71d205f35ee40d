"""Where and with what a measurement was taken: code commit, library versions, machine, device, threads, time.

Stored with every result record (``env``), never part of a cell's identity: the same configuration measured on
two machines is the same cell, measured twice.

>>> env = capture_environment("cpu")
>>> sorted(env)[:3]
['allocator', 'cpu_model', 'cuda_version']
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

import drbench
from drbench.measure.allocator import hold_freed_memory
from drbench.ops.drconv import default_drconv_impl
from drbench.ops.functional import default_region_conv_impl
from drbench.ops.region_conv_cpu import blas as compiled_blas

_SOURCE_DIR = Path(drbench.__file__).resolve().parent


def capture_environment(device: str | torch.device) -> dict:
    """A JSON-able description of this process's environment for measurements on ``device``."""
    device = torch.device(device)
    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "drbench_version": drbench.__version__,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "machine": machine_id(),
        "cpu_model": cpu_model(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        # What DRConv cells run unless their options name an implementation (the fastest one for the device): the
        # region_conv2d implementation (mixture generator) and the layer's path (dynamic and static generators).
        "region_conv_impl": default_region_conv_impl(device.type),
        "drconv_impl": default_drconv_impl(device.type),
        "drconv_blas": compiled_blas(),  # the compiled kernels' products (None without them)
        # timing holds freed memory (no page faults per call); a process that measures has set it already
        "allocator": hold_freed_memory(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@functools.cache
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding drbench's sources; (None, None) outside one.

    ``dirty`` means tracked files differ from the commit; untracked files (results, scratch) do not count.
    """
    try:
        commit = run_git("rev-parse", "HEAD")
        dirty = bool(run_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, dirty


def run_git(*args: str, repo: str | Path | None = None) -> str:
    """``git ARGS`` in ``repo`` (default: the checkout holding drbench's sources, whose commits results record)."""
    return subprocess.run(
        ["git", *args], cwd=repo if repo is not None else _SOURCE_DIR, check=True, capture_output=True, text=True,
        timeout=30,
    ).stdout.strip()


@functools.cache
def cpu_model() -> str:
    """The processor's marketing name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def machine_id() -> str:
    """The name resume uses for "the same machine": the hostname (``DRBENCH_MACHINE`` overrides it)."""
    return os.environ.get("DRBENCH_MACHINE") or socket.gethostname()
