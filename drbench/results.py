"""The results store: JSON Lines files of self-describing records, one record per measured cell.

Layout: ``<results_dir>/<suite>/<run-id>.jsonl``, one file per ``drbench run`` (run id: UTC time, host and
process id, so names never collide). A record is appended, flushed and fsync'ed the moment its cell finishes, so a
crash or Ctrl-C loses at most the cell in flight. Each record holds::

    schema          1 (the record format version; :class:`drbench.record.Record` is the typed form)
    suite, run_id   which suite and which run wrote it
    config          the cell's full configuration (flat: model, width, op, operator options, input_size, ...)
    config_hash     SHA-256 of the canonical JSON of ``config`` (16 hex digits): the cell's identity across runs,
                    machines and commits (the environment is not part of it)
    metric_settings each metric's resolved settings (latency budget, ...)
    status          "ok" or "error"; ``error`` (message) and ``traceback`` (text) when it failed
    metrics         metric name -> result dict; ``value`` is the headline figure, raw samples sit beside it
    env             git commit and dirty flag, drbench/torch/CUDA/cuDNN versions, device and CPU names, threads,
                    hostname, machine id, time
    started, duration_s

Readers (:func:`read_records`, :func:`load`) take a file or a folder (every ``*.jsonl`` below it, so the files
of several runs, workers or machines merge by reading them together). Every line goes through the typed
:class:`~drbench.record.Record`: a line that does not parse or validate, such as the truncated last line of a killed
writer or a hand-edited record, is skipped with a :class:`StoreWarning` naming its file and line, never an
unreadable store.

Concurrency: each writer owns its file, so writers never interleave bytes. A run also holds an exclusive
``flock`` on ``<suite>/.lock`` (:meth:`ResultsStore.lock`), so a second ``drbench run`` of the same suite into the
same folder is refused with a clear message rather than measuring the same cells twice; workers of one run (later
executors) write their own run files under the parent's lock.

>>> store = ResultsStore("results/quick")
>>> len(store.records()), len(store.completed())
(12, 12)
>>> frame = load("results/quick")
>>> frame[["model", "op", "macs", "latency"]].head(2).values.tolist()
[['shufflenetv2', 'conv', 1000000, 0.002], ['shufflenetv2', 'condconv', 2000000, 0.004]]
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import pandas as pd
from pydantic import ValidationError

from drbench.record import Record, short_repr

LOCK_FILE = ".lock"


class StoreWarning(UserWarning):
    """A line of a results file that could not be read (and was skipped)."""


class StoreLockedError(RuntimeError):
    """Another process is running a suite into the same results folder."""


def new_run_id() -> str:
    """A unique, time-ordered run name: ``20250101T120000Z-host-1234``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{socket.gethostname()}-{os.getpid()}"


def resume_key(record: Mapping[str, Any]) -> tuple:
    """What makes two records "the same measurement" for resume: configuration, metric settings, commit,
    machine and thread count."""
    env = record.get("env", {})
    settings = json.dumps(record.get("metric_settings", {}), sort_keys=True)
    return record["config_hash"], settings, env.get("git_commit"), env.get("machine"), env.get("threads")


class RunWriter:
    """Appends records to one run file, each flushed and fsync'ed before :meth:`append` returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def append(self, record: Mapping[str, Any]) -> None:
        """Validate ``record`` as a :class:`Record` (a line readers would skip is never written) and store it."""
        line = json.dumps(Record.model_validate(record).to_dict(), separators=(",", ":"))
        try:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:  # a full disk says so without a file name: name the file
            raise OSError(error.errno, error.strerror, str(self.path)) from None
        self.count += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ResultsStore:
    """The records of one suite: ``<results_dir>/<suite>/``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def writer(self, run_id: str | None = None) -> RunWriter:
        return RunWriter(self.directory / f"{run_id or new_run_id()}.jsonl")

    def records(self) -> list[dict]:
        return read_records(self.directory) if self.directory.exists() else []

    def completed(self) -> set[tuple]:
        """Resume keys of every successful record."""
        return {resume_key(r) for r in self.records() if r.get("status") == "ok"}

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the suite folder exclusively; :class:`StoreLockedError` if another process holds it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / LOCK_FILE).open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(handle)
                raise StoreLockedError(
                    f"{self.directory} is in use by {holder}; wait for that run to finish or choose another "
                    "--results-dir"
                ) from None
            handle.truncate(0)
            handle.write(f"drbench run (pid {os.getpid()} on {socket.gethostname()})")
            handle.flush()
            try:
                yield
            finally:
                handle.truncate(0)  # a later run that finds the folder locked never reads this run's name
                fcntl.flock(handle, fcntl.LOCK_UN)

    def holder(self) -> str | None:
        """Who holds :meth:`lock` now (``drbench run (pid ... on host)``), or None when no run holds it."""
        path = self.directory / LOCK_FILE
        if not path.is_file():
            return None
        with path.open("r") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_holder(handle)
            fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def _read_holder(handle: IO[str], patience_s: float = 1.0) -> str:
    """The name the lock's holder wrote into ``handle``.

    The holder writes its name just after it takes the lock, so a run that finds the lock taken may read the file
    before the name is there: wait up to ``patience_s`` for it.
    """
    deadline = time.monotonic() + patience_s
    while True:
        handle.seek(0)
        holder = handle.read().strip()
        if holder or time.monotonic() > deadline:
            return holder or "another process"
        time.sleep(0.02)


def result_files(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file, else every ``*.jsonl`` below it, in name (= time) order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such results file or folder")
    return sorted(path.rglob("*.jsonl"))


def read_records(path: str | Path) -> list[dict]:
    """Every valid record in a results file or folder, as :meth:`drbench.record.Record.to_dict` gives it.

    A file that cannot be read, and a line that is not UTF-8, not JSON or not a valid :class:`Record`, is skipped
    with one :class:`StoreWarning` naming the file and line (and the field at fault); the rest of the store stays
    usable and nothing is changed on disk.
    """
    records = []
    for file in result_files(path):
        try:
            lines = file.read_bytes().split(b"\n")
        except OSError as error:
            warnings.warn(f"{file}: skipped unreadable file ({error.strerror})", StoreWarning, stacklevel=2)
            continue
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(parse_record(line))
            except ValueError as error:
                last = number == len(lines)  # a complete last line ends with a newline, so lines[-1] == b""
                what = "truncated last line" if last else "unreadable line"
                warnings.warn(f"{file}:{number}: skipped {what} ({error})", StoreWarning, stacklevel=2)
    return records


def parse_record(line: bytes | str) -> dict:
    """One results file line as a valid record's dict; ValueError saying what is wrong (and where) otherwise."""
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(data, dict) or "config_hash" not in data:
        raise ValueError("not a drbench record")
    try:
        return Record.model_validate(data).to_dict()
    except ValidationError as error:
        raise ValueError(f"invalid record: {validation_message(error)}") from None


def validation_message(error: ValidationError) -> str:
    """The first error of a validation as ``field.path: message (got value)``, the value cut short."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "record"
    return f"{where}: {first['msg']} (got {short_repr(first.get('input'))})"


def load(path: str | Path) -> pd.DataFrame:
    """One row per record of a results file or folder, flattened for analysis.

    Columns: ``suite``, ``run_id``, ``config_hash``, ``status``, ``error``, ``traceback``, ``duration_s``;
    every configuration key under its own name (``model``, ``width``, ``op``, ``regions``, ...); each metric's
    headline under the metric's name (``macs``, ``params``, ``latency`` in seconds, ``memory`` in bytes) and
    its other fields as ``<metric>.<key>`` (``latency.samples``, ``latency.noisy``; nested dicts such as
    ``latency.train`` stay dicts);
    ``settings.<metric>.<key>``; and ``env.<key>`` (``env.git_commit``, ``env.threads``, ...).
    """
    return pd.DataFrame([flatten_record(record) for record in read_records(path)])


def flatten_record(record: Mapping[str, Any]) -> dict[str, Any]:
    row = {key: record.get(key) for key in ("suite", "run_id", "config_hash", "status", "error", "traceback",
                                            "started", "duration_s")}
    row.update(record.get("config", {}))
    for name, result in record.get("metrics", {}).items():
        for key, value in result.items():
            row[name if key == "value" else f"{name}.{key}"] = value
    for name, settings in record.get("metric_settings", {}).items():
        row.update({f"settings.{name}.{key}": value for key, value in settings.items()})
    row.update({f"env.{key}": value for key, value in record.get("env", {}).items()})
    return row


