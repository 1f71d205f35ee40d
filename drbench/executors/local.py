"""The ``local`` executor: each part measured in the run's own process, one after another, in matrix order.

This is ``drbench run``'s default and the only executor that shows a metric's progress (epochs, seeds) in the
progress bar. A crash of the process ends the run (stored cells survive and resume skips them); use the
``process`` executor when a cell may crash, hang or run out of memory.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from drbench.executors.base import CellObserver, Executor, PartOutcome, PartTask, measure_part


class LocalExecutor(Executor):
    name = "local"
    blocking = True

    def __init__(self) -> None:
        self._queue: deque[PartTask] = deque()
        self._observer: CellObserver | None = None

    def start(self, tasks: Sequence[PartTask], observer: CellObserver) -> None:
        self._queue.extend(tasks)
        self._observer = observer

    def poll(self, wait_s: float) -> list[PartOutcome]:
        """Measure the next part (``wait_s`` does not apply: measuring is the wait)."""
        if not self._queue:
            return []
        task = self._queue.popleft()
        self._observer.cell_started(task.cell)
        return [measure_part(task, self._observer.cell_status)]

    @property
    def unfinished(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        self._queue.clear()
