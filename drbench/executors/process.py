"""The ``process`` executor: parts measured in worker processes, so one cell's crash, hang or OOM stays its own.

- ``workers`` processes (``--workers N``) are started with the *spawn* method (a fresh interpreter: torch and
  fork do not mix) and each measures one part at a time, sent over a pipe; the run stores the records.
- A worker that dies while measuring (``os._exit``, a segfault, the kernel's OOM killer) makes that part an error
  ``WorkerCrashed: worker process killed by SIGSEGV ...``; a part still running after ``timeout_s``
  (``--timeout``) has its worker killed and becomes ``TimeoutError: ...``. Either way a fresh worker takes the
  slot and the matrix goes on. The clock starts when the worker receives the part, not while it starts up.
- ``gpus`` (``--gpus 0,1``) pins one worker to each GPU: worker *i* is started with
  ``CUDA_VISIBLE_DEVICES=gpus[i]``, so a cell's ``cuda`` device is that GPU, and its replacement after a crash
  keeps the slot's GPU. ``workers`` defaults to one per GPU.
- Workers ignore Ctrl-C: the run stops them (killing the parts in flight, which resume measures again).

>>> executor = ProcessExecutor(workers=2, timeout_s=600)
>>> executor.name
'process'
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Iterator, Mapping, Sequence

from drbench.executors.base import (
    CellObserver,
    Executor,
    ExecutorError,
    PartOutcome,
    PartTask,
    failed_part,
    measure_part,
    utc_now,
    worker_description,
)

_READY = "ready"
_STOP_GRACE_S = 5.0


@dataclass
class _Worker:
    """One worker process, its GPU, and the part it is measuring."""

    slot: int
    gpu: str | None
    process: multiprocessing.process.BaseProcess
    connection: Connection
    ready: bool = False
    stopping: bool = False
    task: PartTask | None = None
    started: str = ""
    clock: float = 0.0  # time.monotonic() when the part was sent

    def failed(self, error: str) -> PartOutcome:
        """The error outcome of the part this worker was measuring when it died or was killed."""
        environ = {"CUDA_VISIBLE_DEVICES": self.gpu} if self.gpu is not None else {}
        return failed_part(self.task, error, self.started, time.monotonic() - self.clock,
                           worker_description(self.process.pid, environ))


class ProcessExecutor(Executor):
    name = "process"

    def __init__(self, workers: int | None = None, timeout_s: float | None = None, gpus: Sequence[str] = ()) -> None:
        if gpus and workers not in (None, len(gpus)):
            raise ExecutorError(f"--workers {workers} with --gpus {','.join(gpus)}: the process executor runs one "
                                "worker per GPU; leave --workers out or list as many GPUs as workers")
        self.gpus = tuple(gpus)
        self.workers = len(self.gpus) or workers or 1
        self.timeout_s = timeout_s or None
        self._spawn_context = multiprocessing.get_context("spawn")
        self._queue: deque[PartTask] = deque()
        self._workers: dict[int, _Worker] = {}
        self._observer: CellObserver | None = None

    def check(self, tasks: Sequence[PartTask]) -> None:
        numbered = [t.cell.label() for t in tasks if t.cell.device.startswith("cuda:")] if self.gpus else []
        if numbered:
            raise ExecutorError(f"--gpus gives each worker one GPU, seen as 'cuda'; cells asking for a numbered "
                                f"device cannot run there: {numbered[0]} ({len(numbered)} cells)")

    def start(self, tasks: Sequence[PartTask], observer: CellObserver) -> None:
        self._queue.extend(tasks)
        self._observer = observer
        for slot in range(min(self.workers, len(tasks))):
            self._spawn(slot)

    def poll(self, wait_s: float) -> list[PartOutcome]:
        outcomes = self._dispatch()
        workers = list(self._workers.values())
        handles = [w.connection for w in workers] + [w.process.sentinel for w in workers]
        ready = set(multiprocessing.connection.wait(handles, timeout=self._wait_time(wait_s)))
        for worker in workers:
            if worker.connection in ready or worker.process.sentinel in ready:
                outcomes += self._receive(worker)
        outcomes += self._expire()
        return outcomes + self._dispatch()

    @property
    def unfinished(self) -> int:
        return len(self._queue) + sum(w.task is not None for w in self._workers.values())

    def close(self) -> None:
        """Stop idle workers politely; kill busy ones (their parts are lost; resume measures them again) and
        those still starting up."""
        self._queue.clear()
        for worker in self._workers.values():
            if worker.ready and worker.task is None:
                self._stop(worker)
            else:
                worker.process.kill()
        for worker in self._workers.values():
            worker.process.join(_STOP_GRACE_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.connection.close()
        self._workers.clear()

    # -- internals ---------------------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        ours, theirs = self._spawn_context.Pipe()
        process = self._spawn_context.Process(target=worker_main, args=(theirs,), name=f"drbench-worker-{slot}")
        gpu = self.gpus[slot] if self.gpus else None
        with _environment({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}):
            process.start()
        theirs.close()
        self._workers[slot] = _Worker(slot, gpu, process, ours)

    def _dispatch(self) -> list[PartOutcome]:
        """Send queued parts to idle workers; stop the workers that no part is left for."""
        outcomes = []
        for worker in list(self._workers.values()):
            if not worker.ready or worker.stopping or worker.task is not None:
                continue
            if not self._queue:
                self._stop(worker)
                continue
            task = self._queue.popleft()
            try:
                worker.connection.send(task)
            except OSError:  # the worker died while idle: its replacement takes the part
                self._queue.appendleft(task)
                outcomes += self._lost(worker)
                continue
            worker.task, worker.started, worker.clock = task, utc_now(), time.monotonic()
            self._observer.cell_started(task.cell)
        return outcomes

    def _receive(self, worker: _Worker) -> list[PartOutcome]:
        """Read the worker's messages; if it has ended, deal with that."""
        outcomes, ended = [], False
        try:
            while worker.connection.poll():
                message = worker.connection.recv()
                if message == _READY:
                    worker.ready = True
                else:
                    outcomes.append(message)
                    worker.task = None
        except (EOFError, OSError):
            ended = True
        if ended or not worker.process.is_alive():
            outcomes += self._lost(worker)
        return outcomes

    def _lost(self, worker: _Worker) -> list[PartOutcome]:
        """A worker ended: its part (if any) is an error; a fresh worker takes the slot if parts remain."""
        worker.process.join(_STOP_GRACE_S)
        worker.connection.close()
        del self._workers[worker.slot]
        if worker.stopping:
            return []
        if not worker.ready:
            raise ExecutorError(f"a worker process could not start ({describe_exit(worker.process.exitcode)}); "
                                "its error output is above")
        outcomes = []
        if worker.task is not None:
            outcomes.append(worker.failed(f"WorkerCrashed: {describe_exit(worker.process.exitcode)} while "
                                          "measuring this cell"))
        if self._queue:
            self._spawn(worker.slot)
        return outcomes

    def _expire(self) -> list[PartOutcome]:
        """Kill the workers whose part has run past the timeout; fresh workers take their slots."""
        outcomes = []
        for worker in list(self._workers.values()):
            if worker.task is None or self.timeout_s is None or time.monotonic() - worker.clock < self.timeout_s:
                continue
            worker.process.kill()
            worker.process.join()
            worker.connection.close()
            del self._workers[worker.slot]
            outcomes.append(worker.failed(
                f"TimeoutError: the cell did not finish within the per-cell timeout of {self.timeout_s:g} s; "
                f"its worker process (pid {worker.process.pid}) was killed"
            ))
            if self._queue:
                self._spawn(worker.slot)
        return outcomes

    def _stop(self, worker: _Worker) -> None:
        worker.stopping = True
        with contextlib.suppress(OSError):
            worker.connection.send(None)

    def _wait_time(self, wait_s: float) -> float:
        """``wait_s``, shortened so that a part's timeout is enforced on time."""
        if self.timeout_s is None:
            return wait_s
        deadlines = [w.clock + self.timeout_s - time.monotonic() for w in self._workers.values() if w.task]
        return max(0.0, min([wait_s, *deadlines]))


def worker_main(connection: Connection) -> None:
    """A worker's life: say it is ready, then measure each part it receives until told to stop (None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the run decides
    connection.send(_READY)
    while True:
        try:
            task = connection.recv()
        except EOFError:
            return  # the run is gone
        if task is None:
            return
        started = utc_now()
        try:
            outcome = measure_part(task)
        except Exception as error:  # noqa: BLE001  (importing the metric modules or claiming the cell failed)
            outcome = failed_part(task, f"{type(error).__name__}: {error}", started, 0.0, worker_description(),
                                  traceback.format_exc())
        try:
            connection.send(outcome)
        except Exception as error:  # noqa: BLE001  (a metric returned something that cannot be sent)
            connection.send(dataclasses.replace(outcome, metrics={}, error=f"{type(error).__name__}: cannot send "
                                                f"the cell's result back to the run: {error}"))


def describe_exit(exitcode: int | None) -> str:
    """How a worker ended, in words: killed by a signal (SIGKILL suggests the OOM killer) or an exit code."""
    if exitcode is None:
        return "worker process did not exit"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"worker process killed by {name}{hint}"
    return f"worker process exited with code {exitcode}"


@contextlib.contextmanager
def _environment(updates: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables while a worker is started (a spawned worker inherits them), then restore."""
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
