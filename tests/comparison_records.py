"""Synthetic result records for the comparison and history tests (shaped like the store's, through the typed
:class:`drbench.record.Record`), timings with realistic noise, and a git repository of empty commits."""

from __future__ import annotations

import json
import math
import random
import subprocess
from pathlib import Path

from drbench.measure.timing import LatencyMeasurement
from drbench.record import SCHEMA_VERSION, Record
from drbench.suite import config_hash

CONV = {"model": "shufflenetv2", "width": 0.5, "op": "conv", "input_size": 32, "batch_size": 2, "device": "cpu"}
DRCONV = {**CONV, "op": "drconv", "regions": 4}


def make_record(config: dict, *, latency: list[float] | None = None, macs: int | None = None,
                accuracy: list[float] | None = None, commit: str | None = "a" * 40, dirty: bool = False,
                threads: int = 1, started: str = "2025-01-01T00:00:00+00:00", suite: str = "synthetic",
                error: str | None = None, reference: list[float] | None = None, torch_version: str = "2.13.0") -> dict:
    """A record as drbench.results stores it, with only the fields the comparison reads (``reference``: the
    reference kernel's samples, timed in turns with ``latency``'s)."""
    metrics = {}
    if latency is not None:
        metrics["latency"] = {"value": sorted(latency)[len(latency) // 2], "samples": latency}
        if reference is not None:  # as drbench stores them: every field of both measurements
            timed = LatencyMeasurement(tuple(latency), 4, 1, 1, 1, "cpu",
                                       reference=LatencyMeasurement(tuple(reference), 1, 1, 1, 1, "cpu"))
            metrics["latency"] = {"value": timed.median, **timed.to_dict()}
    if macs is not None:
        metrics["macs"] = {"value": macs}
        metrics["params"] = {"value": macs // 10}
    if accuracy is not None:
        metrics["accuracy"] = {"value": sum(accuracy) / len(accuracy),
                               "runs": [{"seed": i, "top1": a} for i, a in enumerate(accuracy)]}
    return Record.model_validate({
        "schema": SCHEMA_VERSION, "suite": suite, "run_id": started, "config": config, "config_hash": config_hash(config),
        "status": "error" if error else "ok", "error": error, "metrics": {} if error else metrics,
        "env": {"git_commit": commit, "git_dirty": dirty, "threads": threads, "machine": "box",
                "device_name": "cpu", "torch_version": torch_version, "time": started},
        "started": started,
    }).to_dict()


def write_store(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def timings(rng: random.Random, median: float, n: int, noise: float = 0.03) -> list[float]:
    """``n`` positive timings around ``median``: log-normal, as the spread of real timings is."""
    return [median * math.exp(rng.gauss(0, noise)) for _ in range(n)]


def git_repo(path: Path, commits: int) -> list[str]:
    """A repository with ``commits`` empty commits; their hashes, oldest first."""
    path.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(path)]
    subprocess.run([*git, "init", "-q"], check=True)
    for index in range(commits):
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", f"commit {index}"], check=True)
    return subprocess.run([*git, "rev-list", "--reverse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.split()
