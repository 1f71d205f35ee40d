"""Model zoo: ShuffleNetV2, MobileNetV2, MobileNetV1 and MobileFaceNet, with any operator at any placement.

>>> from drbench.models import create_model, list_models
>>> model = create_model("shufflenetv2", width=0.5, op="drconv", regions=8)
"""

# Importing the family modules registers them; the import order is the listing order.
from drbench.models import shufflenetv2, mobilenetv2, mobilenetv1, mobilefacenet  # noqa: F401
from drbench.models.builder import ConvSite, LayerBuilder, Placement, make_divisible
from drbench.models.registry import ModelSpec, create_model, get_model, list_models, register_model
from drbench.models.replace import replace_convs

__all__ = [
    "ConvSite",
    "LayerBuilder",
    "ModelSpec",
    "Placement",
    "create_model",
    "get_model",
    "list_models",
    "make_divisible",
    "register_model",
    "replace_convs",
]
