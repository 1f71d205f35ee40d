"""Hand-made results records in the store's real format, for the report tests.

Each record goes through the typed :class:`drbench.record.Record`, as every reader's does, and is shaped like the
runner's (``drbench.runner``): the configuration as ``Cell.config()`` gives it,
its hash from ``drbench.suite.config_hash``, latency from a real ``LatencyMeasurement`` built on given samples,
and accuracy as ``measure_accuracy`` stores it. Written with the store's own ``RunWriter``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from drbench.measure.timing import LatencyMeasurement
from drbench.record import SCHEMA_VERSION, Record
from drbench.results import RunWriter
from drbench.suite import config_hash

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def record(
    model: str = "shufflenetv2",
    width: float = 0.5,
    op: str = "conv",
    *,
    macs: int | None = None,
    params: int | None = None,
    latency: Sequence[float] | None = None,
    reference: Sequence[float] | None = None,
    memory: int | None = None,
    top1: Sequence[float | None] | None = None,
    input_size: int | list[int] = 32,
    error: str | None = None,
    commit: str = COMMIT,
    dirty: bool = False,
    machine: str = "bench-1",
    started: str = "2026-01-01T00:00:00+00:00",
    suite: str = "handmade",
    recipe: dict | None = None,
    **options: Any,
) -> dict:
    """One record; ``latency`` are raw per-call samples in seconds (``reference``: the reference kernel's, timed in
    turns with them), ``top1`` the per-seed accuracies (%, None for
    a seed whose training diverged), ``recipe`` the training recipe each run stores."""
    config = {"model": model, "width": width, "op": op, "input_size": input_size, "placement": "default",
              "small_input": True, "num_classes": 10, "batch_size": 1, "dtype": "float32", "device": "cpu",
              **options}
    metrics: dict[str, dict] = {}
    if macs is not None:
        metrics["macs"] = {"value": macs, "executed_flops": 2 * macs, "unsupported_ops": {}}
    if params is not None:
        metrics["params"] = {"value": params}
    if latency is not None:
        beside = None if reference is None else LatencyMeasurement(tuple(reference), 1, 1, 1, 1, "cpu")
        measured = LatencyMeasurement(tuple(latency), batch_size=1, warmup=1, calls_per_block=1, threads=2,
                                      device="cpu", reference=beside)
        metrics["latency"] = {"value": measured.median, **measured.to_dict()}
    if memory is not None:
        metrics["memory"] = {"value": memory, "peak_bytes": memory, "device": "cpu", "method": "test"}
    if top1 is not None:
        metrics["accuracy"] = accuracy_metric(top1, recipe)
    return Record.model_validate({
        "schema": SCHEMA_VERSION,
        "suite": suite,
        "run_id": "test-run",
        "config": config,
        "config_hash": config_hash(config),
        "metric_settings": {name: {} for name in metrics},
        "status": "error" if error else "ok",
        "error": error,
        "traceback": "Traceback: ..." if error else None,
        "metrics": {} if error else metrics,
        "env": {"git_commit": commit, "git_dirty": dirty, "torch_version": "2.13.0+cpu", "hostname": machine,
                "machine": machine, "device": "cpu", "device_name": "Test CPU", "threads": 2, "time": started},
        "started": started,
        "duration_s": 1.0,
    }).to_dict()


def accuracy_metric(per_seed: Sequence[float | None], recipe: dict | None = None) -> dict:
    """The ``accuracy`` metric's stored form (drbench.measure.accuracy.measure_accuracy); None: a diverged seed."""
    finished = [value for value in per_seed if value is not None]
    return {
        "value": statistics.fmean(finished) if finished else None,
        "std": (statistics.stdev(finished) if len(finished) > 1 else 0.0) if finished else None,
        "seeds": list(range(len(per_seed))),
        "diverged": len(per_seed) - len(finished),
        "runs": [{"seed": seed, "status": "ok" if value is not None else "diverged", "top1": value,
                  **({} if recipe is None else {"recipe": recipe})} for seed, value in enumerate(per_seed)],
    }


def write_store(directory: Path, records: Iterable[dict], run_id: str = "run-1") -> Path:
    """Write ``records`` as one run file under ``directory``; returns the file."""
    with RunWriter(directory / f"{run_id}.jsonl") as writer:
        for item in records:
            writer.append(item)
    return writer.path


def sweep_records() -> list[dict]:
    """A store with every plot's axes: two widths of two families (conv, drconv, condconv, with accuracy),
    region counts 2 to 8, and input sizes 16 to 64 with local conv; one noisy cell and one failed cell."""
    quiet = lambda ms: [ms / 1e3 * f for f in (0.98, 0.99, 1.0, 1.01, 1.02)]  # noqa: E731
    records = []
    for model, base in (("shufflenetv2", 10_000_000), ("mobilenetv2", 20_000_000)):
        for width in (0.5, 1.0):
            scale = 4 * width * width
            macs = int(base * scale)
            records += [
                record(model, width, "conv", macs=macs, params=int(macs / 30), latency=quiet(2 * scale),
                       memory=2**20, top1=[60.0 + 10 * width, 61.0 + 10 * width]),
                record(model, width, "drconv", macs=int(macs * 1.1), params=int(macs / 10), latency=quiet(5 * scale),
                       memory=2**21, top1=[63.0 + 8 * width, 64.0 + 8 * width], regions=4),
                record(model, width, "condconv", macs=int(macs * 1.05), params=int(macs / 15),
                       latency=quiet(3 * scale), memory=2**21, top1=[62.0 + 9 * width, 62.5 + 9 * width], experts=4),
            ]
    records += [record("shufflenetv2", 0.5, "drconv", macs=int(11_000_000 + m * 100_000), params=400_000 * m,
                       latency=quiet(4 + m), regions=m, started="2026-01-01T00:01:00+00:00") for m in (2, 8)]
    records += [record("mobilenetv2", 0.5, op, macs=int(4_000_000 * (s / 16) ** 2), input_size=s,
                       params=300_000 * ((s / 16) ** 2 if op == "local" else 1), latency=quiet(s / 8))
                for s in (16, 64) for op in ("conv", "local")]
    records.append(record("shufflenetv2", 0.5, "drconv", macs=11_000_000, params=1_000_000, regions=16,
                          latency=[0.010, 0.020, 0.030, 0.015, 0.025]))
    records.append(record("mobilenetv2", 1.0, "local", error="ValueError: local needs input_size"))
    return records
