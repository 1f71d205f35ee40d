"""Measurements of a model or operator: latency, memory (and complexity).

>>> from drbench.measure import time_callable, forward_peak_memory
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
]
