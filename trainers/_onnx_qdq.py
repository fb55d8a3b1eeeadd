"""Integer activations in the ONNX export: ``QuantizeLinear``/``DequantizeLinear`` on the inputs of
the layers a trial quantized (``act_bits = 8``), so that onnxruntime runs them on integer kernels.

The model is exported with its input quantization off (torch's exporter has no fake quantization);
:func:`quantize_inputs` then puts back, in front of each such layer's ``Gemm``/``MatMul``/``Conv``,
a ``QuantizeLinear`` and a ``DequantizeLinear`` with the scale and zero point the trial trained
with (:func:`~slimtune.trainers.methods.input_qparams`). Its weight, when the artifact stores it
as codes of at most 8 bits, becomes a ``DequantizeLinear`` of those codes (as ``INT8``) with the
trial's per-channel scales, and its bias an ``INT32`` ``DequantizeLinear`` at the product of the
two scales: the QDQ pattern onnxruntime fuses into ``QGemm``, ``QLinearMatMul`` or
``QLinearConv`` (``ReLU`` and ``MaxPool`` between two quantized layers go into the requantization).
What onnxruntime does not fuse (a layer before an addition, say) keeps its weight as ``Cast`` and
``Mul``, which it folds into float weights when it loads the file (a ``DequantizeLinear`` left
unfused would run at every call: see ``_onnx._integer_weights``), and gets its input quantized in
float operators (:func:`_emulated`). Which layers fuse is asked of
onnxruntime itself (:func:`fused_weights`), not guessed, until the file it writes fuses every
layer it says (a layer may fuse only beside a quantized neighbour); a bias whose codes would not
fit int32 keeps its layer on float operators.

Example::

    layers = quantize_inputs(path, {"fc1": quant}, {"fc1.weight": ("fc1.weight", 0)},
                             {"fc1.weight": stored}, state)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._pack import StoredCodes
from .methods import ACT_QMAX, ACT_QMIN, InputQuant, input_qparams

LINEAR_OPS = {"Gemm": 1, "MatMul": 1, "Conv": 1}  # op -> the input index of its weight
WEIGHT_DQ_MAX_BITS = 8  # integer kernels read int8 weights: codes of up to 8 bits


def _consumer(graph: Any, tensor: str, layer: str) -> Any:
    """The one ``Gemm``/``MatMul``/``Conv`` node reading ``tensor`` as the weight of ``layer``
    (a ``ValueError`` when there is none, or several: a layer called twice)."""
    found = [node for node in graph.node if node.op_type in LINEAR_OPS
             and len(node.input) > LINEAR_OPS[node.op_type] and node.input[LINEAR_OPS[node.op_type]] == tensor]
    if len(found) != 1:
        raise ValueError(f"the input of layer {layer!r} is not found in the ONNX graph ({len(found)} Gemm, MatMul or "
                         "Conv nodes read its weight; int8 inputs are exported for a layer called once)")
    return found[0]


def _producer(graph: Any, tensor: str) -> Any | None:
    return next((node for node in graph.node if tensor in node.output), None)


def _initializer(graph: Any, name: str) -> Any | None:
    return next((init for init in graph.initializer if init.name == name), None)


def weight_tensor_names(path: str, weights: Mapping[str, np.ndarray]) -> dict[str, tuple[str, int]]:
    """``{weight key: (ONNX tensor name, output axis)}`` of a float ONNX file's initializers that
    are these weights (by name, or as the exporter laid them out: transposed for a ``MatMul``)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    out: dict[str, tuple[str, int]] = {}
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer if len(init.dims) >= 2}
    for key, weight in weights.items():
        if key in arrays and np.array_equal(arrays[key], weight):
            out[key] = (key, 0)
            continue
        for name, array in arrays.items():
            if array.ndim == 2 and array.shape == weight.T.shape and np.array_equal(array, weight.T):
                out[key] = (name, 1)
                break
    return out


def _weight_key(layer: str, state: Mapping[str, Any]) -> str | None:
    """The state key of the weight that reads the layer's input (``<layer>.weight``; a low-rank
    layer's quantized input is its first factor's, ``fc1.0``)."""
    key = f"{layer}.weight"
    return key if key in state else None


def _replace_weight(graph: Any, target: str, stored: StoredCodes, axis: int, codes_array: np.ndarray) -> None:
    """The ``Cast``/``Mul`` that give ``target`` from codes become one ``DequantizeLinear`` of int8 codes."""
    from onnx import helper, numpy_helper

    for node in [n for n in graph.node if target in n.output or f"{target}.float" in n.output]:
        graph.node.remove(node)
    for name in (f"{target}.codes", f"{target}.scales"):
        init = _initializer(graph, name)
        if init is not None:
            graph.initializer.remove(init)
    scales = stored.scales.numpy().astype(np.float32)
    graph.initializer.extend([numpy_helper.from_array(codes_array.astype(np.int8), f"{target}.q8"),
                              numpy_helper.from_array(scales, f"{target}.q8scale"),
                              numpy_helper.from_array(np.zeros(len(scales), np.int8), f"{target}.q8zero")])
    graph.node.insert(0, helper.make_node("DequantizeLinear", [f"{target}.q8", f"{target}.q8scale", f"{target}.q8zero"],
                                          [target], axis=axis, name=f"dequantize {target}"))


def _replace_bias(graph: Any, node: Any, weight_scales: np.ndarray, input_scale: float) -> None:
    """The node's float bias (an initializer) becomes int32 codes at ``input_scale * weight_scales``."""
    from onnx import helper, numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        return
    init = _initializer(graph, node.input[2])
    if init is None or _producer(graph, node.input[2]) is not None:
        return
    bias = numpy_helper.to_array(init).astype(np.float64)
    scales = (np.float32(input_scale) * weight_scales.astype(np.float32)).astype(np.float32)
    if bias.shape != scales.shape:
        return
    codes = np.clip(np.round(bias / scales), -2**31, 2**31 - 1).astype(np.int32)
    name = init.name
    graph.initializer.remove(init)
    graph.initializer.extend([numpy_helper.from_array(codes, f"{name}.q32"),
                              numpy_helper.from_array(scales, f"{name}.q32scale"),
                              numpy_helper.from_array(np.zeros(len(scales), np.int32), f"{name}.q32zero")])
    graph.node.insert(0, helper.make_node("DequantizeLinear", [f"{name}.q32", f"{name}.q32scale", f"{name}.q32zero"],
                                          [name], axis=0, name=f"dequantize {name}"))


def _quantize_linear(graph: Any, node: Any, prefix: str, scale: float, zero_point: int) -> str:
    """``QuantizeLinear`` and ``DequantizeLinear`` of ``node``'s first input, in front of it; the new input's name."""
    from onnx import helper, numpy_helper

    graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}.scale"),
                              numpy_helper.from_array(np.array(zero_point, np.int8), f"{prefix}.zero")])
    index = list(graph.node).index(node)
    graph.node.insert(index, helper.make_node("DequantizeLinear", [f"{prefix}.q", f"{prefix}.scale", f"{prefix}.zero"],
                                              [f"{prefix}.dq"], name=f"dequantize {prefix}"))
    graph.node.insert(index, helper.make_node("QuantizeLinear", [node.input[0], f"{prefix}.scale", f"{prefix}.zero"],
                                              [f"{prefix}.q"], name=f"quantize {prefix}"))
    return f"{prefix}.dq"


def _emulated(graph: Any, node: Any, prefix: str, scale: float, zero_point: int) -> str:
    """The fake quantization of ``node``'s first input in float operators, as torch computes it
    (``(clip(round(x * (1 / scale)) + zero, -128, 127) - zero) * scale``), in front of it: for a
    layer on float kernels (a ``QuantizeLinear`` there would let onnxruntime requantize its float
    weights by its own scales). Returns the new input's name."""
    from onnx import helper, numpy_helper

    constants = {"inverse": np.float32(1) / np.float32(scale), "scale": np.float32(scale),
                 "zero": np.float32(zero_point), "low": np.float32(ACT_QMIN), "high": np.float32(ACT_QMAX)}
    graph.initializer.extend([numpy_helper.from_array(np.array(value, np.float32), f"{prefix}.{key}")
                              for key, value in constants.items()])
    steps = [("Mul", [node.input[0], f"{prefix}.inverse"], "scaled"), ("Round", [f"{prefix}.scaled"], "rounded"),
             ("Add", [f"{prefix}.rounded", f"{prefix}.zero"], "shifted"),
             ("Clip", [f"{prefix}.shifted", f"{prefix}.low", f"{prefix}.high"], "codes"),
             ("Sub", [f"{prefix}.codes", f"{prefix}.zero"], "centered"),
             ("Mul", [f"{prefix}.centered", f"{prefix}.scale"], "fq")]
    index = list(graph.node).index(node)
    for op, inputs, out in reversed(steps):
        graph.node.insert(index, helper.make_node(op, inputs, [f"{prefix}.{out}"], name=f"{out} {prefix}"))
    return f"{prefix}.fq"


def _rewrite(path: str, out: str, quants: Mapping[str, InputQuant], tensors: Mapping[str, tuple[str, int]],
             state: Mapping[str, Any], codes: Mapping[str, StoredCodes], dq_weights: set[str]) -> None:
    """Write ``path`` with every quantized layer's input quantized to ``out``: for the weights of
    ``dq_weights`` (keys) by ``QuantizeLinear``/``DequantizeLinear``, the weight an int8
    ``DequantizeLinear`` and the bias int32; for the others in float operators (:func:`_emulated`)."""
    import onnx

    model = onnx.load(path)
    graph = model.graph
    for layer, quant in quants.items():
        key = _weight_key(layer, state)
        if key not in tensors:
            raise ValueError(f"the input of layer {layer!r} is not found in the ONNX graph (its weight is not)")
        node = _consumer(graph, tensors[key][0], layer)
        scale, zero_point = (t.item() for t in input_qparams(quant))
        if key in dq_weights:
            node.input[0] = _quantize_linear(graph, node, f"{layer}.input", scale, zero_point)
            target, axis = tensors[key]
            stored = codes[key]
            codes_array = stored.codes.numpy().T if axis == 1 else stored.codes.numpy()
            _replace_weight(graph, target, stored, axis, codes_array)
            if node.op_type in ("Gemm", "Conv"):
                _replace_bias(graph, node, stored.scales.numpy(), scale)
        else:
            node.input[0] = _emulated(graph, node, f"{layer}.input", scale, zero_point)
    onnx.save(model, out)


def fused_weights(path: str, candidates: set[str], targets: Mapping[str, str]) -> set[str]:
    """The weight keys of ``candidates`` whose int8 ``DequantizeLinear`` onnxruntime fused into an
    integer kernel when optimizing ``path`` (none of them is left a ``DequantizeLinear``)."""
    import onnx
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="slimtune-qdq-") as folder:
        optimized = os.path.join(folder, "optimized.onnx")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = optimized
        onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(optimized).graph
    left = {name for node in graph.node if node.op_type == "DequantizeLinear" for name in node.input}
    return {key for key in candidates if f"{targets[key]}.q8" not in left}


def quantize_inputs(path: str, quants: Mapping[str, InputQuant], tensors: Mapping[str, tuple[str, int]],
                    codes: Mapping[str, StoredCodes], state: Mapping[str, Any]) -> list[str]:
    """Rewrite the ONNX file ``path`` in place: Q/DQ on the inputs of the layers of ``quants``,
    and the int8 weights onnxruntime fuses into integer kernels (see the module docstring).
    ``tensors``: ``{weight key: (ONNX tensor name, axis)}``; ``codes``: the stored codes of the
    weights written as integers. Returns the layers that run on integer kernels."""
    keys = {layer: _weight_key(layer, state) for layer in quants}
    candidates = {key for layer, key in keys.items()
                  if key in codes and key in tensors and codes[key].bits <= WEIGHT_DQ_MAX_BITS
                  and _bias_fits(state, key, codes[key], float(input_qparams(quants[layer])[0]))}
    targets = {key: tensors[key][0] for key in candidates}
    with tempfile.TemporaryDirectory(prefix="slimtune-qdq-") as folder:
        probe = os.path.join(folder, "probe.onnx")
        while True:  # whether a layer fuses can depend on its neighbours': until onnxruntime fuses every candidate
            _rewrite(path, probe, quants, tensors, state, codes, candidates)
            fused = fused_weights(probe, candidates, targets)
            if fused == candidates:
                break
            candidates = fused
    _rewrite(path, path, quants, tensors, state, codes, candidates)
    return sorted(layer for layer, key in keys.items() if key in candidates)


def _bias_fits(state: Mapping[str, Any], weight_key: str, stored: StoredCodes, input_scale: float) -> bool:
    """Whether the layer's bias (if any) has int32 codes at ``input_scale`` times its weight scales."""
    bias = state.get(weight_key.rpartition(".")[0] + ".bias")
    if bias is None:
        return True
    scales = np.float32(input_scale) * stored.scales.numpy().astype(np.float32)
    return bool(np.all(np.abs(np.asarray(bias, np.float64) / scales) < 2**31 - 1))

