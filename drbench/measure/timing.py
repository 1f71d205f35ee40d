"""Latency measurement: warm-up, timed blocks until the spread is small or the budget is spent, every sample kept.

Measuring is separate from presenting, as in ``torch.utils.benchmark``: the functions here return
:class:`LatencyMeasurement` value objects (raw samples plus the statistics derived from them), and reports decide
how to show them.

- A *sample* is the time of one call, in seconds: a timed block of ``n`` calls gives one sample of
  ``block_time / n``. Calls shorter than ``min_block_s`` are grouped so that clock resolution and launch overhead
  do not dominate; a model's forward pass is usually long enough to be one call per block.
- After ``warmup`` untimed calls, and at least :data:`MIN_WARMUP_S` of them, blocks are timed until at least
  ``min_blocks`` samples exist and either IQR/median is at most ``target_rel_iqr`` or the time spent in timed
  blocks reaches ``budget_s``.
- A measurement whose IQR/median exceeds 10% is flagged ``noisy`` (torch.utils.benchmark's threshold).
- On CUDA, blocks are timed with CUDA events after a synchronisation: kernel launches are asynchronous, and a
  wall clock around them measures the launch, not the work.
- :func:`time_interleaved` times several callables in turns (A B A B ...), so that slow drifts of a shared
  machine (other jobs, thermal state) affect all of them alike; compare ratios from one such call, never absolute
  times from different runs.
- :func:`time_with_reference` times a callable in turns with :func:`reference_kernel`, a fixed single-threaded
  convolution, and keeps the reference's samples beside its own: sample i of each was timed next to the other, so
  ``relative_samples`` (each over the reference's) carry the callable's cost with the machine's speed of the
  moment divided out. That is what lets two runs minutes apart on a shared machine be compared
  (:mod:`drbench.compare`). The reference always runs on one thread, and each of its blocks follows a few
  milliseconds of untimed calls (:data:`REFERENCE_SETTLE_S`), so that neither the cell's thread count nor what the
  cell left behind (caches, a spinning thread pool) moves it: a change of the cell's thread count shows.
  (Measured under load: dividing each sample by its own round's reference flagged none of 15 same-commit rows;
  dividing by the run's reference median, which leaves the drift within a run in, flagged one.)
- Timed blocks run with the garbage collector off, as ``timeit``'s do, and freed memory stays in the process
  (:func:`drbench.measure.allocator.hold_freed_memory`): otherwise glibc's malloc hands large tensors back to the
  kernel and each call pays page faults for them again.

>>> import torch
>>> m = time_callable(lambda: torch.ones(64, 64) @ torch.ones(64, 64), budget_s=0.05)
>>> m.median > 0 and len(m.samples) >= 5
True
>>> a, b = time_interleaved({"a": lambda: torch.ones(8).sum(), "b": lambda: torch.ones(9).sum()}, budget_s=0.05).values()
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Mapping, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from drbench.measure.allocator import hold_freed_memory
from drbench.stats import NOISY_REL_IQR

MIN_BLOCK_S = 0.01
"""Calls shorter than this are grouped into blocks at least this long."""

MIN_WARMUP_S = 0.3
"""Warm-up lasts at least this long, however few calls ``warmup`` asks for: a model's first calls run slow for tens
to hundreds of milliseconds (the allocator, oneDNN's primitives for new shapes, first touches of the weights). With
the quick suite's single warm-up call, MobileNetV2 0.35x DRConv's first blocks took 13-15 ms and the rest 8 ms
(IQR/median 10-22%, "noisy"), and the block size was chosen from the cold call. 0.1 s was not enough in a fresh
process (``make demo`` on a new clone): the first 6 forward blocks of that cell, and the first training steps of
ShuffleNetV2 DRConv and local, still ran 10-60% slow, and flagged the forward noisy (12%; 9% without them)."""

REFERENCE_SETTLE_S = 0.01
"""Untimed reference-kernel calls before each timed reference block. Right after a cell's block the first reference
call ran 2-3.5x slower than alone (its data evicted from cache by the cell), and after a two-thread cell on a
machine whose other core was busy, the cell's OpenMP worker, still spinning, took time slices from the reference
for about 5 ms: a block timed straight after the cell measured the cell's aftermath, which changes with the cell's
code and thread count, as well as the machine (see :func:`time_with_reference`)."""


@dataclass(frozen=True)
class LatencyMeasurement:
    """Raw per-call samples (seconds) of one callable, and the statistics derived from them.

    ``batch_size`` is the number of images one call processes (for throughput); ``calls_per_block`` how many
    calls each sample averages; ``threads`` the torch intra-op thread count while timing; ``reference`` the
    :func:`reference_kernel` timed in turns with it (:func:`time_with_reference`), one sample per round.
    """

    samples: tuple[float, ...]
    batch_size: int
    warmup: int
    calls_per_block: int
    threads: int
    device: str
    reference: LatencyMeasurement | None = None

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a LatencyMeasurement needs at least one sample")

    @property
    def median(self) -> float:
        return _quantile(self.samples, 0.5)

    @property
    def iqr(self) -> float:
        return _quantile(self.samples, 0.75) - _quantile(self.samples, 0.25)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def mean(self) -> float:
        return math.fsum(self.samples) / len(self.samples)

    @property
    def rel_iqr(self) -> float:
        return _rel_iqr(self.samples)

    @property
    def noisy(self) -> bool:
        return self.rel_iqr > NOISY_REL_IQR

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch_size / self.median

    @property
    def relative_samples(self) -> tuple[float, ...] | None:
        """Each sample over the reference's sample of the same round; None without a reference."""
        if self.reference is None:
            return None
        return tuple(own / ref for own, ref in zip(self.samples, self.reference.samples))

    def to_dict(self) -> dict:
        """JSON-able: the raw fields plus the derived statistics (the statistics are recomputed on load)."""
        fields = asdict(self)
        if self.reference is None:
            del fields["reference"]
        else:
            fields["reference"] = self.reference.to_dict()
        return {
            **fields,
            "samples": list(self.samples),
            "median_s": self.median,
            "iqr_s": self.iqr,
            "min_s": self.min,
            "mean_s": self.mean,
            "throughput": self.throughput,
            "noisy": self.noisy,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> LatencyMeasurement:
        fields = cls.__dataclass_fields__
        reference = cls.from_dict(data["reference"]) if data.get("reference") else None
        return cls(**{**{k: v for k, v in data.items() if k in fields}, "samples": tuple(data["samples"]),
                      "reference": reference})

    def __str__(self) -> str:
        flag = "  (noisy)" if self.noisy else ""
        return (
            f"median {self.median * 1e3:.3f} ms, IQR {self.iqr * 1e3:.3f} ms, min {self.min * 1e3:.3f} ms, "
            f"{self.throughput:.1f} img/s over {len(self.samples)} samples{flag}"
        )


class BlockTimer(Protocol):
    """Times one block: ``start()`` before the calls, ``stop()`` after them returns the elapsed seconds."""

    def start(self) -> None: ...

    def stop(self) -> float: ...


class WallClockTimer:
    """``time.perf_counter`` around a block: right for CPU work, which is synchronous."""

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self._start


class CudaEventTimer:
    """CUDA events recorded on the current stream around a block, read after synchronising."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        self._start.record()

    def stop(self) -> float:
        self._end.record()
        torch.cuda.synchronize(self.device)
        return self._start.elapsed_time(self._end) / 1e3


def block_timer_for(device: str | torch.device) -> BlockTimer:
    """The timer that measures work on ``device`` honestly: CUDA events on a GPU, the wall clock on a CPU."""
    device = torch.device(device)
    return CudaEventTimer(device) if device.type == "cuda" else WallClockTimer()


def time_callable(fn: Callable[[], object], **options) -> LatencyMeasurement:
    """Time ``fn()``; ``options`` are :func:`time_interleaved`'s (device, budget_s, warmup, ..., timer)."""
    return time_interleaved({"fn": fn}, **options)["fn"]


def reference_kernel(device: str | torch.device = "cpu") -> Callable[[], object]:
    """A fixed convolution, about half a millisecond on one CPU core, always on one thread on CPU.

    It stands for the machine's speed of the moment: timed in turns with a cell, its samples move with whatever
    else slows the machine down (other processes, clock changes), while the cell's own changes (code, thread
    count) leave it alone.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 28, 28, generator=generator).to(device)
    weight = torch.randn(32, 32, 3, 3, generator=generator).to(device)
    on_cpu = torch.device(device).type == "cpu"

    def run() -> torch.Tensor:
        with torch.inference_mode(), fixed_threads(1 if on_cpu else 0):
            return F.conv2d(x, weight, padding=1)

    return run


def time_with_reference(fn: Callable[[], object], **options) -> LatencyMeasurement:
    """Time ``fn()`` in turns with :func:`reference_kernel` on the same device (``options`` as
    :func:`time_interleaved`'s; the budget covers both); the measurement carries the reference's samples.

    Each reference block follows :data:`REFERENCE_SETTLE_S` of untimed reference calls, so that it measures the
    machine of the moment and not the aftermath of the cell's block (caches, the cell's thread pool): one thread,
    re-warmed, whatever the cell ran before it.
    """
    reference = reference_kernel(options.get("device", "cpu"))
    timed = time_interleaved({"fn": fn, "reference": reference}, settle_s={"reference": REFERENCE_SETTLE_S},
                             **options)
    return replace(timed["fn"], reference=replace(timed["reference"], batch_size=1))


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    device: str | torch.device = "cpu",
    budget_s: float = 1.0,
    warmup: int = 3,
    min_blocks: int = 5,
    target_rel_iqr: float = 0.05,
    batch_size: int = 1,
    timer: BlockTimer | None = None,
    warmup_s: float = MIN_WARMUP_S,
    settle_s: Mapping[str, float] | None = None,
) -> dict[str, LatencyMeasurement]:
    """Time several callables in turns, one block each per round, until all are steady or the budget is spent.

    The budget is shared: it bounds the total time spent in timed blocks of all callables together. Each callable
    warms up for ``warmup`` calls and at least ``warmup_s`` seconds; ``settle_s`` maps a callable's name to the
    seconds of untimed calls of it before each of its blocks (not counted in the budget).
    ``batch_size`` is the images per call (for throughput); ``timer`` replaces the device's clock (tests).
    """
    if not fns:
        raise ValueError("time_interleaved needs at least one callable")
    if min_blocks < 2:
        raise ValueError(f"min_blocks must be at least 2 to judge the spread, got {min_blocks}")
    hold_freed_memory()  # page faults of freshly mapped memory are the allocator's cost, not the callables'
    timer = timer or block_timer_for(device)
    calls = {name: _calls_per_block(fn, timer, warmup, warmup_s) for name, fn in fns.items()}
    settle = settle_s or {}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    while True:
        for name, fn in fns.items():
            _call_for(fn, settle.get(name, 0.0))
            block = _time_block(fn, calls[name], timer)
            spent += block
            samples[name].append(block / calls[name])
        enough = len(samples[next(iter(fns))]) >= min_blocks
        steady = all(_rel_iqr(s) <= target_rel_iqr for s in samples.values())
        if enough and (steady or spent >= budget_s):
            break
    threads = torch.get_num_threads()
    return {
        name: LatencyMeasurement(tuple(samples[name]), batch_size, warmup, calls[name], threads, str(device))
        for name in fns
    }


def paired_ratio(candidate: LatencyMeasurement, baseline: LatencyMeasurement) -> float:
    """Median over rounds of candidate / baseline, each round's two blocks timed one after the other (the two
    measurements of one :func:`time_interleaved` call): the machine's drift divides out of each round.

    >>> fast, slow = LatencyMeasurement((1.0, 2.0, 9.0), 1, 0, 1, 1, "cpu"), LatencyMeasurement((2.0, 4.0, 3.0), 1, 0, 1, 1, "cpu")
    >>> paired_ratio(fast, slow)
    0.5
    """
    return _quantile([c / b for c, b in zip(candidate.samples, baseline.samples)], 0.5)


def _calls_per_block(fn: Callable[[], object], timer: BlockTimer, warmup: int, warmup_s: float) -> int:
    """Run the warm-up calls (``warmup``, and for at least ``warmup_s``); from the last one's duration choose how
    many calls make a block of MIN_BLOCK_S."""
    for _ in range(max(warmup - 1, 0)):
        fn()
    _call_for(fn, warmup_s)
    one_call = _time_block(fn, 1, timer)
    return max(1, math.ceil(MIN_BLOCK_S / one_call)) if one_call > 0 else 1


def _call_for(fn: Callable[[], object], seconds: float) -> None:
    """Call ``fn`` untimed until ``seconds`` have passed (not at all for 0)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        fn()


def _time_block(fn: Callable[[], object], calls: int, timer: BlockTimer) -> float:
    """The time of ``calls`` calls, with Python's cyclic garbage collector off (as ``timeit`` does): a full
    collection walks every object of the process (140 ms with drbench's runner, models and report imported, 265,000
    objects), in whichever block it falls, which says nothing about the callable."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        timer.start()
        for _ in range(calls):
            fn()
        return timer.stop()
    finally:
        if collecting:
            gc.enable()


def _quantile(values: tuple[float, ...] | list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without the numpy round trip."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _rel_iqr(samples: tuple[float, ...] | list[float]) -> float:
    median = _quantile(samples, 0.5)
    return (_quantile(samples, 0.75) - _quantile(samples, 0.25)) / median if median > 0 else math.inf


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` (0: leave torch's setting); yields the count in use."""
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def forward_latency(
    model: nn.Module, example: torch.Tensor, *, reference: bool = False, **timing
) -> LatencyMeasurement:
    """Inference latency of ``model(example)``: eval mode, ``torch.inference_mode``; ``timing`` as time_callable.
    ``reference``: time it in turns with :func:`reference_kernel` (:func:`time_with_reference`)."""
    model.eval()

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(example)

    timed = time_with_reference if reference else time_callable
    return timed(forward, batch_size=example.shape[0], **timing)


def train_step_latency(
    model: nn.Module, example: torch.Tensor, targets: torch.Tensor, *, reference: bool = False, **timing
) -> LatencyMeasurement:
    """Latency of one training step: forward, cross-entropy loss, backward and an SGD step (momentum 0.9).

    The model's parameters change as it is timed: pass a copy if they matter. ``reference`` as in
    :func:`forward_latency`.
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(example), targets).backward()
        optimizer.step()

    timed = time_with_reference if reference else time_callable
    return timed(step, batch_size=example.shape[0], **timing)
