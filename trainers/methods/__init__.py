"""Compression methods, one module each, behind one protocol (:class:`CompressionMethod`).

They apply in this order, each to every layer of a plan: ``lowrank`` (a layer becomes two thin
factors), ``units`` (dropped output units masked, with the next layer's inputs that read them),
``prune`` (unstructured masks) and ``quantize`` (fake quantization of weights and, with
``act_bits = 8``, of inputs; float16 biases). A method
registered with :func:`register_method` applies after them.

Example:
    >>> [m.name for m in methods()]
    ['lowrank', 'units', 'prune', 'quantize']
"""

from __future__ import annotations

from ._base import (
    ApplyContext,
    Codec,
    CompressionMethod,
    FitContext,
    Mask,
    masked_before,
    method,
    methods,
    register_method,
    straight_through,
    unregister_method,
)
from ._graph import MODEL_OUTPUT, UnitGroup, traced, unit_groups
from ._inputs import (
    ACT_BITS, ACT_QMAX, ACT_QMIN, InputQuant, attach_input_quant, check_input_ranges, float_inputs, input_qparams,
    input_quantized,
)
from ._layers import COMPRESSIBLE, bias_tensors, is_compressible, weight_tensors
from .lowrank import (
    Factorized,
    LowRank,
    factorize,
    factorized_ranks,
    factorized_shell,
    full_rank,
    rank_for,
    replace_submodule,
    weight_modules,
)
from .prune import (
    DynamicPruning,
    GradualPruning,
    Prune,
    PruneMask,
    allowed_mask,
    cubic_sparsity,
    importance,
    layer_input_scales,
    magnitude_mask,
    pruned_weights,
)
from .quantize import FP16_SCALE_MAX_BITS, FakeQuant, HalfPrecision, Quantize, channel_scales, dequantize, quantize
from .units import UnitMask, Units, allowed_weights, unit_keeps

for _method in (LowRank(), Units(), Prune(), Quantize()):
    register_method(_method)

__all__ = [
    "ACT_BITS", "ACT_QMAX", "ACT_QMIN", "ApplyContext", "COMPRESSIBLE", "Codec", "CompressionMethod", "DynamicPruning", "FP16_SCALE_MAX_BITS",
    "Factorized", "FakeQuant", "FitContext", "GradualPruning", "HalfPrecision", "InputQuant", "LowRank", "MODEL_OUTPUT", "Mask",
    "Prune", "PruneMask", "Quantize", "UnitGroup", "UnitMask", "Units", "allowed_mask", "allowed_weights",
    "attach_input_quant", "bias_tensors", "channel_scales", "check_input_ranges", "cubic_sparsity", "dequantize", "factorize", "factorized_ranks",
    "factorized_shell", "float_inputs", "full_rank", "importance", "input_qparams", "input_quantized", "is_compressible", "layer_input_scales", "magnitude_mask",
    "masked_before", "method", "methods", "pruned_weights", "quantize", "rank_for", "register_method",
    "replace_submodule", "straight_through", "traced", "unit_groups", "unit_keeps", "unregister_method",
    "weight_modules", "weight_tensors",
]
