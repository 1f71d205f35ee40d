"""Convolution operators: standard, DRConv, CondConv and local convolution, built by name.

>>> from drbench.ops import create_conv, list_ops
>>> list_ops()
['conv', 'drconv', 'condconv', 'local']
>>> layer = create_conv("drconv", 16, 32, 1, regions=8)
"""

from drbench.ops import conv  # noqa: F401  (registration order is the listing order)
from drbench.ops.functional import region_conv2d, region_conv_impls
from drbench.ops.registry import OpSpec, create_conv, get_op, list_ops, register_op

__all__ = ["OpSpec", "create_conv", "get_op", "list_ops", "region_conv2d", "region_conv_impls", "register_op"]
