"""Complexity of a model: multiply-adds (MACs) and parameters as the papers count them, and the FLOPs it executes.

``macs`` follows the convention of the DRConv, ShuffleNetV2 and MobileNet papers: one per multiply-add of the
convolutions and fully connected layers (matrix products included), counted by fvcore's ``FlopCountAnalysis``.
BatchNorm, activations, pooling and element-wise arithmetic are not counted (:data:`NOT_COUNTED_OPS`, given
explicit handles that count nothing); an operator with no rule at all is listed in ``unsupported_ops`` and warned
about, never dropped silently. drbench's own operators count their algorithmic cost:

- DRConv: the selected-filter convolution (one filter per position, as a standard convolution costs), plus the
  guided-mask convolution and the filter generator (ordinary convolutions, counted as such). Never the m-fold
  work of an implementation that computes every region's output.
- CondConv: routing (a linear layer), mixing the experts once per sample (a matrix product), then the
  convolution.
- local convolution: as a standard convolution of the same shape (an einsum over unfolded patches).

``executed_flops`` is what the implementation really computes, measured with
``torch.utils.flop_counter.FlopCounterMode`` (two FLOPs per multiply-add; the reference DRConv shows its m-fold
work here).

>>> from drbench.models import create_model
>>> cost = complexity(create_model("shufflenetv2", width=0.5), 224)
>>> cost.macs, cost.params            # the ShuffleNetV2 paper: 41M MACs, 1.4M parameters
(40476448, 1366792)
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch.nn as nn
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import bmm_flop_jit, einsum_flop_jit, get_shape
from torch.utils.flop_counter import FlopCounterMode

from drbench.models.probe import example_input, image_shape, inference
from drbench.ops.functional import region_conv_op_names

Handle = Callable[[list[Any], list[Any]], int | Counter]

NOT_COUNTED_OPS = (
    # normalisation
    "aten::batch_norm", "aten::group_norm", "aten::instance_norm", "aten::layer_norm",
    # activations
    "aten::hardtanh", "aten::hardtanh_", "aten::prelu", "aten::sigmoid", "aten::softmax",
    # pooling and averaging
    "aten::max_pool2d", "aten::avg_pool2d", "aten::adaptive_avg_pool2d", "aten::mean",
    # element-wise arithmetic (residual and bias additions) and scalar shape arithmetic under tracing
    "aten::add", "aten::add_", "aten::mul", "aten::sub", "aten::floor_divide",
    # data movement and selection (a unit's shared DRConv guide resized by nearest neighbour)
    "aten::im2col", "aten::argmax", "aten::pad", "aten::constant_pad_nd", "aten::upsample_nearest2d",
)
"""Operators that the published convention does not count: :func:`not_counted` is their handle.

fvcore's own way to ignore an op, a ``None`` handle, does not replace its default rules (batch_norm and
adaptive_avg_pool2d would still count), hence a handle that counts nothing.
"""


def not_counted(inputs: list[Any], outputs: list[Any]) -> Counter:
    """Counts nothing: for the operators of :data:`NOT_COUNTED_OPS`."""
    return Counter()


def region_conv_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """region_conv2d(x, guide, filters): one k x k filter per output position, B * O * C * kh * kw * H' * W'."""
    _, _, out_channels, in_channels, kh, kw = get_shape(inputs[2])
    batch, _, out_h, out_w = get_shape(outputs[0])
    return batch * out_channels * in_channels * kh * kw * out_h * out_w


def factored_region_conv_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """factored_region_conv2d(x, guide, [coeffs], [bias], *weights), the structured DRConv path: the paper's cost of
    the layer it computes, as if the filters had been generated and applied. The selected-filter convolution,
    B * O * C * kh * kw * H' * W', plus, with coefficients (B, m, Q + 1, kh * kw) (the dynamic generator), the
    generator's grouped 1x1 conv, B * m * kh * kw * Q * O * C (its bias term is an addition, not counted); the
    static generator's filters cost nothing to generate.

    Tensors come in order: x and guide (4-d), coefficients (4-d, when given), bias (1-d, when given), weights (3-d).
    """
    shapes = [get_shape(value) for value in inputs]
    x_shape = shapes[0]
    coeffs = shapes[2] if len(shapes) > 2 and len(shapes[2]) == 4 else None
    weights = [shape for shape in shapes if len(shape) == 3]
    batch, out_channels, out_h, out_w = get_shape(outputs[0])
    channels = x_shape[1]
    taps = coeffs[3] if coeffs else weights[0][2] // channels
    selected = batch * out_channels * channels * taps * out_h * out_w
    generator = batch * coeffs[1] * taps * (len(weights) - 1) * out_channels * channels if coeffs else 0
    return selected + generator


def pairwise_einsum_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """A two-operand einsum costs the product of the sizes of all its indices (one multiply-add each).

    Exact, where fvcore's generic rule parses numpy's rounded printout and allocates arrays of the operands'
    shapes; einsums of other arity go to fvcore's rule.
    """
    equation = inputs[0].toIValue().replace(" ", "")
    shapes = [get_shape(value) for value in inputs[1].node().inputs()]
    operands = equation.split("->")[0].split(",")
    if len(operands) != 2:
        return int(einsum_flop_jit(inputs, outputs))
    sizes = {index: size for operand, shape in zip(operands, shapes) for index, size in zip(operand, shape)}
    macs = 1
    for size in sizes.values():
        macs *= size
    return macs


def baddbmm_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """baddbmm(input, batch1, batch2): the batched matrix product's multiply-adds; the added input is not counted
    (as a convolution's bias is not)."""
    return bmm_flop_jit(inputs[1:3], outputs)


def op_handles() -> dict[str, Handle]:
    """fvcore op handles of the drbench convention (region_conv2d under each implementation's name)."""
    handles: dict[str, Handle] = {name: not_counted for name in NOT_COUNTED_OPS}
    handles["aten::einsum"] = pairwise_einsum_flop_jit
    handles["aten::baddbmm"] = baddbmm_flop_jit
    handles.update({name: region_conv_flop_jit for name in region_conv_op_names()})
    handles["prim::PythonOp.FactoredRegionConv2d"] = factored_region_conv_flop_jit
    return handles


@dataclass(frozen=True)
class LayerComplexity:
    """MACs and parameters of one module of the breakdown."""

    name: str
    macs: int
    params: int


@dataclass(frozen=True)
class Complexity:
    """What :func:`complexity` counted, for a batch of ``batch_size`` inputs of ``input_size`` (C, H, W).

    ``macs`` and ``executed_flops`` are for the whole batch; ``by_layer`` holds the modules at the breakdown's
    depth (the stages of drbench's models at depth 1); ``unsupported_ops`` maps operators with no counting rule
    to how often they ran.
    """

    macs: int
    params: int
    executed_flops: int
    input_size: tuple[int, int, int]
    batch_size: int
    by_layer: tuple[LayerComplexity, ...] = ()
    unsupported_ops: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for JSON and the results store."""
        result = asdict(self)
        result["input_size"] = list(self.input_size)
        result["by_layer"] = [asdict(layer) for layer in self.by_layer]
        return result


def complexity(
    model: nn.Module, input_size: int | tuple[int, ...], batch_size: int = 1, depth: int = 1
) -> Complexity:
    """Count ``model``'s MACs (fvcore, drbench's convention), parameters and executed FLOPs on a random input.

    ``input_size``: an int (square, 3 channels), (H, W) or (C, H, W). ``depth``: how deep in the module tree the
    ``by_layer`` breakdown goes (1: the model's direct children). The model runs in eval mode, without
    gradients; its mode is restored afterwards.

    >>> from drbench.models import create_model
    >>> cost = complexity(create_model("mobilenetv2", width=1.0), 224)
    >>> cost.params
    3504872
    """
    shape = image_shape(input_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    example = example_input(model, shape, batch_size)
    with inference(model):
        counted = _fvcore_analysis(model, example)
        total, by_module, unsupported = int(round(counted.total())), counted.by_module(), counted.unsupported_ops()
        with FlopCounterMode(display=False) as executed:
            model(example)
    if unsupported:
        listed = ", ".join(f"{name} x{count}" for name, count in sorted(unsupported.items()))
        warnings.warn(f"complexity: operators with no counting rule, counted as 0: {listed}", stacklevel=2)
    return Complexity(
        macs=total,
        params=sum(parameter.numel() for parameter in model.parameters()),
        executed_flops=int(executed.get_total_flops()),
        input_size=shape,
        batch_size=batch_size,
        by_layer=_breakdown(model, by_module, depth),
        unsupported_ops=dict(sorted(unsupported.items())),
    )


def _fvcore_analysis(model: nn.Module, example: torch.Tensor) -> FlopCountAnalysis:
    analysis = FlopCountAnalysis(model, example)
    for name, handle in op_handles().items():
        analysis.set_op_handle(name, handle)
    # complexity() warns once itself, listing every unsupported operator.
    return analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")


def _breakdown(model: nn.Module, by_module: Counter, depth: int) -> tuple[LayerComplexity, ...]:
    return tuple(
        LayerComplexity(name, int(round(by_module.get(name, 0))), sum(p.numel() for p in module.parameters()))
        for name, module in model.named_modules()
        if name and name.count(".") == depth - 1
    )
