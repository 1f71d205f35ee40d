"""Convolution operators: standard, DRConv, CondConv and local convolution, built by name.

>>> from drbench.ops import create_conv, list_ops
>>> list_ops()
['conv', 'drconv', 'condconv', 'local']
>>> layer = create_conv("drconv", 16, 32, 1, regions=8)
"""

# Importing the operator modules registers them; the import order is the listing order.
from drbench.ops import conv, drconv, condconv, localconv  # noqa: F401
from drbench.ops.condconv import CondConv2d
from drbench.ops.drconv import DRConv2d
from drbench.ops.functional import region_conv2d, region_conv_impls
from drbench.ops.localconv import LocalConv2d
from drbench.ops.registry import OpSpec, create_conv, get_op, list_ops, register_op

__all__ = [
    "CondConv2d",
    "DRConv2d",
    "LocalConv2d",
    "OpSpec",
    "create_conv",
    "get_op",
    "list_ops",
    "region_conv2d",
    "region_conv_impls",
    "register_op",
]
