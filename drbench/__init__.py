"""drbench: benchmarks and ablations for dynamic and region-aware convolutions.

>>> import drbench
>>> from drbench.ops import create_conv
>>> conv = create_conv("drconv", 16, 32, 1, regions=4)
"""

__version__ = "0.1.0"
