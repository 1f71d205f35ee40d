"""Measurements of a model or operator: latency, memory, complexity and short-schedule accuracy.

>>> from drbench.measure import time_callable, forward_peak_memory, train, TrainRecipe
"""

from drbench.measure.complexity import Complexity, LayerComplexity, complexity
from drbench.measure.memory import MemoryMeasurement, forward_peak_memory
from drbench.measure.timing import (
    LatencyMeasurement,
    fixed_threads,
    forward_latency,
    time_callable,
    time_interleaved,
    train_step_latency,
)

_ACCURACY = ("AccuracySettings", "TrainProgress", "TrainRecipe", "TrainResult", "Trained", "evaluate", "train")

__all__ = [
    "Complexity",
    "LayerComplexity",
    "LatencyMeasurement",
    "MemoryMeasurement",
    "complexity",
    "fixed_threads",
    "forward_latency",
    "forward_peak_memory",
    "time_callable",
    "time_interleaved",
    "train_step_latency",
    *_ACCURACY,
]


def __getattr__(name: str):
    # drbench.measure.accuracy loads the data sets and registers a metric: imported on first use, so that timing
    # and memory measurements do not pay for it
    if name in _ACCURACY:
        from drbench.measure import accuracy

        return getattr(accuracy, name)
    raise AttributeError(f"module 'drbench.measure' has no attribute {name!r}")
