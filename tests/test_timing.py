"""Timing and memory measurement: value objects, the stopping rule (with a scripted clock), CUDA path selection."""

from __future__ import annotations

import gc
import itertools
import resource
import subprocess
import sys
import numpy as np
import pytest
import torch
import torch.nn as nn

from drbench.measure import allocator, memory, timing
from drbench.measure.memory import CPU_METHOD, forward_peak_memory
from drbench.measure.timing import (
    CudaEventTimer,
    LatencyMeasurement,
    WallClockTimer,
    block_timer_for,
    fixed_threads,
    forward_latency,
    reference_kernel,
    time_callable,
    time_interleaved,
    time_with_reference,
    train_step_latency,
)


class ScriptedTimer:
    """A block timer whose stop() returns the next scripted duration (seconds)."""

    def __init__(self, durations):
        self.durations = iter(durations)
        self.blocks = 0

    def start(self) -> None:
        pass

    def stop(self) -> float:
        self.blocks += 1
        return next(self.durations)


def measurement(samples, batch_size=1) -> LatencyMeasurement:
    return LatencyMeasurement(tuple(samples), batch_size, warmup=1, calls_per_block=1, threads=1, device="cpu")


def test_statistics_match_numpy():
    samples = [0.010, 0.012, 0.011, 0.030, 0.009, 0.0105]
    m = measurement(samples, batch_size=8)
    assert m.median == pytest.approx(np.median(samples))
    assert m.iqr == pytest.approx(np.percentile(samples, 75) - np.percentile(samples, 25))
    assert m.min == 0.009 and m.mean == pytest.approx(np.mean(samples))
    assert m.throughput == pytest.approx(8 / np.median(samples))


def test_noisy_flag_is_iqr_over_median_above_ten_percent():
    assert not measurement([1.0, 1.0, 1.0, 1.09, 1.0]).noisy
    assert measurement([1.0, 1.2, 0.8, 1.3, 0.7]).noisy


def test_to_dict_keeps_raw_samples_and_round_trips():
    m = measurement([0.5, 0.25, 0.75])
    data = m.to_dict()
    assert data["samples"] == [0.5, 0.25, 0.75] and data["median_s"] == 0.5 and data["noisy"] is True
    assert LatencyMeasurement.from_dict(data) == m
    assert "median 500.000 ms" in str(m)
    with pytest.raises(ValueError):
        measurement([])


def test_a_reference_round_trips_and_divides_each_sample_of_its_round():
    m = LatencyMeasurement((0.5, 0.25, 0.75), 1, 1, 1, 1, "cpu", reference=measurement([0.25, 0.25, 0.5]))
    assert m.relative_samples == (2.0, 1.0, 1.5)
    data = m.to_dict()
    assert data["reference"]["samples"] == [0.25, 0.25, 0.5] and data["reference"]["median_s"] == 0.25
    assert LatencyMeasurement.from_dict(data) == m
    assert measurement([0.5]).relative_samples is None and "reference" not in measurement([0.5]).to_dict()


def test_the_reference_kernel_runs_on_one_thread_whatever_the_cells(monkeypatch):
    seen = []
    real_conv = timing.F.conv2d
    monkeypatch.setattr(timing.F, "conv2d", lambda *a, **k: seen.append(torch.get_num_threads()) or real_conv(*a, **k))
    with fixed_threads(2):
        reference_kernel("cpu")()
        assert torch.get_num_threads() == 2
    assert seen == [1]


def test_time_with_reference_pairs_one_reference_sample_with_each_of_the_callables():
    timer = ScriptedTimer([0.02, 0.01] * 2 + [0.02, 0.01] * 3)  # calibration of each, then rounds: fn, reference
    m = time_with_reference(lambda: None, batch_size=4, budget_s=1.0, warmup=1, min_blocks=3, timer=timer)
    assert m.samples == (0.02,) * 3 and m.batch_size == 4
    assert m.reference.samples == (0.01,) * 3 and m.reference.batch_size == 1
    assert m.relative_samples == (2.0,) * 3


def test_forward_latency_with_reference_times_the_model_and_the_kernel_in_turns():
    m = forward_latency(Probe(), torch.randn(5, 4), reference=True, budget_s=0.01, min_blocks=2, warmup=1)
    assert len(m.reference.samples) == len(m.samples) and m.reference.median > 0


def test_steady_samples_stop_at_min_blocks():
    # warm-up call timed at 20 ms (above MIN_BLOCK_S: one call per block), then steady 20 ms blocks
    timer = ScriptedTimer([0.020] + [0.020] * 100)
    m = time_callable(lambda: None, timer=timer, warmup=2, min_blocks=5, budget_s=10)
    assert len(m.samples) == 5 and m.calls_per_block == 1 and timer.blocks == 6
    assert m.samples == (0.020,) * 5


def test_noisy_samples_continue_until_the_budget_and_keep_every_sample():
    durations = [0.1] + [0.1, 0.3] * 50
    m = time_callable(lambda: None, timer=ScriptedTimer(durations), warmup=1, min_blocks=3, budget_s=0.9,
                      target_rel_iqr=0.05)
    assert m.samples == (0.1, 0.3, 0.1, 0.3, 0.1)  # stopped once 0.9 s had been spent in timed blocks
    assert m.noisy


def test_short_calls_are_grouped_into_blocks():
    calls = []
    # warm-up call takes 1 ms -> 10 calls per block; each block then reports 10 ms
    m = time_callable(lambda: calls.append(1), timer=ScriptedTimer([0.001] + [0.010] * 10), warmup=1,
                      min_blocks=3, budget_s=10, warmup_s=0)
    assert m.calls_per_block == 10
    assert m.samples == pytest.approx((0.001,) * 3)
    assert len(calls) == 1 + 3 * 10


def test_interleaved_timing_alternates_and_shares_the_budget():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    results = time_interleaved(fns, timer=ScriptedTimer([0.02, 0.02] + [0.02] * 20), warmup=1, min_blocks=4,
                               budget_s=10, warmup_s=0)
    assert order == ["a", "b"] + ["a", "b"] * 4
    assert set(results) == {"a", "b"} and all(len(m.samples) == 4 for m in results.values())


class CountingClock:
    """A clock for time.perf_counter that advances ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_warm_up_lasts_at_least_warmup_s_whatever_the_call_count(monkeypatch):
    calls = []
    monkeypatch.setattr(timing.time, "perf_counter", CountingClock(0.001))  # each call "takes" about 1 ms
    time_callable(lambda: calls.append(1), timer=ScriptedTimer([0.01] * 10), warmup=1, min_blocks=3, budget_s=10,
                  warmup_s=0.05)
    # 1 warm-up call would have sized the blocks from a cold call: about 50 ms of calls come first instead
    assert 20 <= len(calls) - 3 <= 60


def test_the_reference_settles_before_each_of_its_blocks_and_the_cell_does_not():
    order = []
    fns = {"cell": lambda: order.append("cell"), "reference": lambda: order.append("reference")}
    timer = ScriptedTimer([0.02] * 30)
    time_interleaved(fns, timer=timer, warmup=1, min_blocks=3, budget_s=10, warmup_s=0,
                     settle_s={"reference": 0.002})
    rounds = order[2:]  # after each callable's calibration call
    blocks = [(name, len(list(run))) for name, run in itertools.groupby(rounds)]
    assert [name for name, _ in blocks] == ["cell", "reference"] * 3
    assert all(count == 1 for name, count in blocks if name == "cell")
    assert all(count > 1 for name, count in blocks if name == "reference")  # untimed calls, then the timed one


@pytest.mark.timing
def test_the_reference_gives_the_same_figure_beside_a_model_at_either_thread_count():
    """The issue's case: ShuffleNetV2 0.5x conv, 224px, batch 8, timed beside the reference kernel with two threads,
    then one (the default 1 s budget). The reference's median stays where it is timed alone, whatever the cell's
    thread count, so the ratio relative to it is the raw ratio (before, it moved 0.42 -> 0.58 ms with the cell and
    read 1.15x for a raw 1.58x)."""
    from drbench.models import create_model

    model, example = create_model("shufflenetv2", width=0.5, op="conv"), torch.randn(8, 3, 224, 224)
    alone = time_callable(reference_kernel("cpu"), budget_s=0.5)
    timed = {}
    for threads in (2, 1):
        with fixed_threads(threads):
            timed[threads] = forward_latency(model, example, reference=True, budget_s=1.0)
    references = {threads: m.reference.median / alone.median for threads, m in timed.items()}
    assert all(0.9 < ratio < 1.1 for ratio in references.values()), references
    raw = timed[1].median / timed[2].median
    relative = np.median(timed[1].relative_samples) / np.median(timed[2].relative_samples)
    assert relative == pytest.approx(raw, rel=0.1), (raw, relative)


def test_real_clock_measures_real_work():
    x = torch.randn(128, 128)
    m = time_callable(lambda: x @ x, budget_s=0.05, min_blocks=3, warmup=1)
    assert len(m.samples) >= 3 and m.min > 0 and m.threads == torch.get_num_threads()


def test_the_cuda_timer_is_chosen_only_for_cuda_devices():
    assert isinstance(block_timer_for("cpu"), WallClockTimer)
    chosen = block_timer_for("cuda:1")
    assert isinstance(chosen, CudaEventTimer) and chosen.device == torch.device("cuda:1")


def test_cuda_timer_synchronises_and_reads_events_in_seconds(monkeypatch):
    calls = []

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing
            self.name = f"event{len([c for c in calls if c.startswith('new')])}"
            calls.append(f"new {self.name}")

        def record(self):
            calls.append(f"record {self.name}")

        def elapsed_time(self, end):
            calls.append("elapsed")
            return 12.5  # milliseconds, as CUDA reports

    monkeypatch.setattr(timing.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda device: calls.append(f"sync {device}"))
    timer = CudaEventTimer(torch.device("cuda:0"))
    timer.start()
    calls.append("work")
    assert timer.stop() == pytest.approx(0.0125)
    assert calls == ["sync cuda:0", "new event0", "new event1", "record event0", "work", "record event1",
                     "sync cuda:0", "elapsed"]


def test_fixed_threads_sets_and_restores():
    before = torch.get_num_threads()
    with fixed_threads(1) as used:
        assert used == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with fixed_threads(0) as used:
        assert used == before


class Probe(nn.Module):
    """Records the mode it was called in."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.seen = set()

    def forward(self, x):
        self.seen.add((self.training, torch.is_inference_mode_enabled()))
        return self.layer(x)


def test_forward_latency_runs_in_eval_and_inference_mode():
    probe = Probe().train()
    m = forward_latency(probe, torch.randn(5, 4), budget_s=0.01, min_blocks=2, warmup=1)
    assert probe.seen == {(False, True)} and m.batch_size == 5


def test_train_step_latency_trains():
    probe = Probe().eval()
    before = probe.layer.weight.detach().clone()
    train_step_latency(probe, torch.randn(5, 4), torch.zeros(5, dtype=torch.long), budget_s=0.01, min_blocks=2,
                       warmup=1)
    assert probe.seen == {(True, False)}
    assert not torch.equal(before, probe.layer.weight)


class TwoSteps(nn.Module):
    def forward(self, x):
        y = x * 2  # 4000 bytes
        z = y + 1  # 4000 more while y is alive
        return z  # y freed here


def test_cpu_peak_memory_counts_live_tensors():
    peak = forward_peak_memory(TwoSteps(), torch.zeros(1000))
    assert peak.peak_bytes == 8000 and peak.method == CPU_METHOD and peak.device == "cpu"


def test_cpu_peak_memory_sees_frees():
    class Chain(nn.Module):
        def forward(self, x):
            for _ in range(5):
                x = x + 1  # each step frees the previous intermediate
            return x

    assert forward_peak_memory(Chain(), torch.zeros(1000)).peak_bytes == 8000


def test_cuda_peak_memory_uses_the_allocator_peak(monkeypatch):
    calls = []
    fake = {
        "synchronize": lambda device: calls.append("sync"),
        "reset_peak_memory_stats": lambda device: calls.append("reset"),
        "memory_allocated": lambda device: 1000,
        "max_memory_allocated": lambda device: 5000,
    }
    for name, function in fake.items():
        monkeypatch.setattr(memory.torch.cuda, name, function)
    example = torch.zeros(3)
    result = memory._cuda_peak(nn.Identity(), example)
    assert result.peak_bytes == 4000 and result.method == memory.CUDA_METHOD
    assert calls == ["sync", "reset", "sync"]


FAULTS_SCRIPT = """
import resource, sys, torch
from drbench.measure.allocator import hold_freed_memory
state = hold_freed_memory() if sys.argv[1] == "held" else "default"

def tensors():  # 4 x 20 MB, made and freed: with glibc's defaults the next call usually faults them in again
    [torch.empty(5 << 20).fill_(1) for _ in range(4)]

for _ in range(3):
    tensors()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    tensors()
print(state, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts from getrusage: Linux")
def test_timing_keeps_freed_memory_so_calls_do_not_page_fault():
    def faults_per_call(mode: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        state, faults = out.stdout.rsplit(maxsplit=1)
        return state, float(faults)

    pages = 4 * (20 << 20) // resource.getpagesize()
    state, held = faults_per_call("held")
    if state == allocator.UNCHANGED:
        pytest.skip("not glibc: the allocator's settings cannot be set")
    _, default = faults_per_call("default")
    if default < pages / 4:  # most runs fault; some keep the blocks (the defaults adapt to what ran before)
        pytest.skip(f"glibc's defaults kept these blocks this time ({default:.0f} faults a call): nothing to compare")
    assert state == allocator.HELD and held < pages / 100


def test_timed_blocks_run_without_the_garbage_collector_and_restore_it():
    seen = []
    timing.time_callable(lambda: seen.append(gc.isenabled()), budget_s=0.02, warmup=2, warmup_s=0.0)
    assert gc.isenabled()
    assert seen[-1] is False and seen[0] is True  # the warm-up call collects as usual, timed calls do not
