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
A convolution fuses only when nothing but ``QuantizeLinear`` nodes read its output (its integer
kernel writes codes). Where something else reads it, after its ``ReLU``, it gets one
(:func:`_output_plan`): a layer on float operators reads it at its own trained range (it
quantizes those codes again, to the same codes); an addition (a residual connection) reads it
through the ``QuantizeLinear`` of a layer reading the same tensor (its trained range) or, where no
layer does, through one whose range is calibrated on training inputs (:func:`output_ranges`: min
and max, as onnxruntime's ``quantize_static`` calibrates). So the convolutions of a residual block
run on integer kernels too, and the addition as ``QLinearAdd`` where one quantizer reads its sum
(:func:`_merge_twin_quantizers`). What an addition reads quantized was not quantized in training;
the export's check bounds what it costs (``_onnx.write_model_onnx`` writes the file again without
it when it fails). Activation codes are written as uint8 (:func:`_uint8_zero`).
What onnxruntime does not fuse even so keeps its weight as ``Cast`` and
``Mul``, which it folds into float weights when it loads the file (a ``DequantizeLinear`` left
unfused would run at every call: see ``_onnx._integer_weights``), and gets its input quantized in
float operators (:func:`_emulated`). Which layers fuse is asked of
onnxruntime itself (:func:`fused_weights`), not guessed, until the file it writes fuses every
layer it says (a layer may fuse only beside a quantized neighbour); a bias whose codes would not
fit int32 keeps its layer on float operators.

Example::

    layers = quantize_inputs(path, {"fc1": quant}, {"fc1.weight": ("fc1.weight", 0)},
                             {"fc1.weight": stored}, state, calibration)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any, NamedTuple

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


def _readers(graph: Any, tensor: str) -> list[Any]:
    return [node for node in graph.node if tensor in node.input]


def _output_end(graph: Any, node: Any) -> str:
    """The tensor a layer's output becomes through a ``Relu`` that is its only reader (onnxruntime
    folds that ``Relu`` into the requantization), else the layer's output itself."""
    readers = _readers(graph, node.output[0])
    return readers[0].output[0] if len(readers) == 1 and readers[0].op_type == "Relu" else node.output[0]


CALIBRATE = "calibrate"  # an output quantization whose range no trained quantizer gives


def _scalar(graph: Any, name: str) -> float:
    from onnx import numpy_helper

    return float(numpy_helper.to_array(_initializer(graph, name)))


def _trained_params(graph: Any, reader: Any) -> tuple[float, int] | None:
    """``(scale, zero point)`` of the trained input quantization that ``reader`` starts: a
    ``QuantizeLinear`` (its uint8 zero point back to int8) or the first ``Mul`` of an emulated one
    (:func:`_emulated`); ``None`` for any other node."""
    if reader.op_type == "QuantizeLinear":
        return _scalar(graph, reader.input[1]), int(_scalar(graph, reader.input[2])) + ACT_QMIN
    if reader.op_type == "Mul" and reader.name.startswith("scaled ") and reader.input[1].endswith(".inverse"):
        prefix = reader.input[1][:-len(".inverse")]
        return _scalar(graph, f"{prefix}.scale"), int(_scalar(graph, f"{prefix}.zero"))
    return None


def _output_plan(graph: Any, node: Any, additions: bool) -> tuple[tuple[float, int] | str, bool] | None:
    """How ``node``, a convolution that did not fuse, gets the ``QuantizeLinear`` on its output
    (after its ``Relu``) that it needs to fuse, and whether an addition reads it: at the trained
    scale and zero point of the layers reading it (exact for a layer on float operators, which
    quantizes the codes again to the same codes; not trained for an addition reading them), or
    :data:`CALIBRATE` where only additions (residual connections) read it; ``None`` where it
    cannot (other readers, layers reading it at different ranges, the model's output, an
    addition when not ``additions``)."""
    if node.op_type != "Conv":
        return None
    end = _output_end(graph, node)
    readers = _readers(graph, end)
    if not readers or end in {out.name for out in graph.output} or all(r.op_type == "QuantizeLinear" for r in readers):
        return None
    trained = {params for params in (_trained_params(graph, r) for r in readers) if params is not None}
    untrained = [r for r in readers if _trained_params(graph, r) is None]
    if any(r.op_type != "Add" for r in untrained) or len(trained) > 1 or (untrained and not additions):
        return None
    return (trained.pop() if trained else CALIBRATE), bool(untrained)


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


def _uint8_zero(zero_point: int) -> np.ndarray:
    """The zero point of int8 codes ``[-128, 127]`` as that of the same codes shifted to uint8
    ``[0, 255]``: the same dequantized values and rounding. Why: onnxruntime converts int8
    activations to uint8 itself (``QDQS8ToU8Transformer``), but only where a ``QuantizeLinear``
    has one reader, and a layer whose input and output codes then differ in type does not fuse."""
    return np.array(zero_point - ACT_QMIN, np.uint8)


def _quantize_linear(graph: Any, node: Any, prefix: str, scale: float, zero_point: int) -> str:
    """``QuantizeLinear`` and ``DequantizeLinear`` of ``node``'s first input, in front of it; the new input's name."""
    from onnx import helper, numpy_helper

    graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}.scale"),
                              numpy_helper.from_array(_uint8_zero(zero_point), f"{prefix}.zero")])
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


def _quantize_output(graph: Any, node: Any, prefix: str, scale: float, zero_point: int) -> None:
    """Let every reader of ``node``'s output (after its ``Relu``) other than a ``QuantizeLinear``
    read it quantized, so that the layer fuses (an integer convolution writes codes): through a
    ``QuantizeLinear`` already reading it (the next layer's input), else through a new one at
    ``scale`` and ``zero_point``; each reader through a ``DequantizeLinear`` of its own
    (onnxruntime fuses a ``DequantizeLinear`` with one reader)."""
    from onnx import helper, numpy_helper

    end = _output_end(graph, node)
    readers = _readers(graph, end)
    shared = next((r for r in readers if r.op_type == "QuantizeLinear"), None)
    if shared is None:
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}.scale"),
                                  numpy_helper.from_array(_uint8_zero(zero_point), f"{prefix}.zero")])
        shared = helper.make_node("QuantizeLinear", [end, f"{prefix}.scale", f"{prefix}.zero"], [f"{prefix}.q"],
                                  name=f"quantize {prefix}")
        graph.node.insert(max(i for i, n in enumerate(graph.node) if end in n.output) + 1, shared)
    index = list(graph.node).index(shared) + 1
    for k, reader in enumerate(r for r in readers if r.op_type != "QuantizeLinear"):
        dequantized = f"{prefix}.dq{k}"
        graph.node.insert(index, helper.make_node("DequantizeLinear", [shared.output[0], *shared.input[1:]],
                                                  [dequantized], name=f"dequantize {prefix} {k}"))
        for i, name in enumerate(reader.input):
            if name == end:
                reader.input[i] = dequantized


def _rewrite(path: str, out: str, quants: Mapping[str, InputQuant], tensors: Mapping[str, tuple[str, int]],
             state: Mapping[str, Any], codes: Mapping[str, StoredCodes], dq_weights: set[str],
             outputs: Mapping[str, tuple[float, int]] | None = None) -> None:
    """Write ``path`` with every quantized layer's input quantized to ``out``: for the weights of
    ``dq_weights`` (keys) by ``QuantizeLinear``/``DequantizeLinear``, the weight an int8
    ``DequantizeLinear`` and the bias int32; for the others in float operators (:func:`_emulated`).
    The layers of ``outputs`` (``{layer: (scale, zero point)}``) get their output quantized too
    (:func:`_quantize_output`)."""
    import onnx

    model = onnx.load(path)
    graph = model.graph
    nodes: dict[str, Any] = {}
    for layer, quant in quants.items():
        key = _weight_key(layer, state)
        if key not in tensors:
            raise ValueError(f"the input of layer {layer!r} is not found in the ONNX graph (its weight is not)")
        node = nodes[layer] = _consumer(graph, tensors[key][0], layer)
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
    for layer, (scale, zero_point) in (outputs or {}).items():
        _quantize_output(graph, nodes[layer], f"{layer}.output", scale, zero_point)
    _merge_twin_quantizers(graph)
    _sort_nodes(graph)
    onnx.save(model, out)


def _sort_nodes(graph: Any) -> None:
    """Order the nodes so that each comes after those whose outputs it reads, as ONNX requires
    (the rewrite inserts nodes beside the ones they serve), keeping the order they have where
    they may. Why our own: ``onnx`` has no graph sort; onnxruntime sorts only what it loads."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    waiting, ordered = list(graph.node), []
    while waiting:
        node = next((n for n in waiting if all(name in ready for name in n.input)), None)
        if node is None:
            raise ValueError("the ONNX graph has a cycle or reads a tensor nothing writes")
        waiting.remove(node)
        ordered.append(node)
        ready.update(node.output)
    del graph.node[:]
    graph.node.extend(ordered)


def _merge_twin_quantizers(graph: Any) -> None:
    """Keep one of the ``QuantizeLinear`` nodes that read the same tensor at the same scale and
    zero point (two layers reading one tensor observe the same range in training): the same
    codes, and what a residual addition needs to fuse (its ``Relu`` must have one reader)."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer if not init.dims}
    kept: dict[tuple[Any, ...], Any] = {}
    for node in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        if any(name not in values for name in node.input[1:]):
            continue
        key = (node.input[0], *(values[name].item() for name in node.input[1:]),
               *(str(values[name].dtype) for name in node.input[1:]))
        twin = kept.setdefault(key, node)
        if twin is node:
            continue
        for reader in _readers(graph, node.output[0]):
            for i, name in enumerate(reader.input):
                if name == node.output[0]:
                    reader.input[i] = twin.output[0]
        graph.node.remove(node)
        used = {name for n in graph.node for name in n.input}
        for name in node.input[1:]:
            init = _initializer(graph, name)
            if init is not None and name not in used:
                graph.initializer.remove(init)


def output_ranges(path: str, layers: Mapping[str, str], calibration: np.ndarray,
                  batch: int = 256) -> dict[str, tuple[float, int]]:
    """``{layer: (scale, zero point)}`` of what each layer's output (``layers``: ``{layer: ONNX
    tensor}``) holds on the ``calibration`` inputs, run through ``path`` as written (its
    quantization in place, no graph optimization): the min and max over all of them, with 0, in
    the formula of :func:`~slimtune.trainers.methods.input_qparams`."""
    import onnx
    import onnxruntime

    model = onnx.load(path)
    model.graph.output.extend([onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                               for t in layers.values()])
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    names = list(layers.values())
    low, high = {t: 0.0 for t in names}, {t: 0.0 for t in names}
    for start in range(0, len(calibration), batch):
        values = session.run(names, {feed: calibration[start:start + batch]})
        for tensor, value in zip(names, values):
            low[tensor], high[tensor] = min(low[tensor], float(value.min())), max(high[tensor], float(value.max()))
    ranges = {}
    for layer, tensor in layers.items():
        quant = InputQuant()
        quant.low.fill_(low[tensor])
        quant.high.fill_(high[tensor])
        scale, zero_point = input_qparams(quant)
        ranges[layer] = (float(scale), int(zero_point))
    return ranges


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


class QdqLayers(NamedTuple):
    """What :func:`quantize_inputs` did: the layers on integer kernels (``integer``) and those of
    them whose output an addition reads quantized (``for_additions``: not trained)."""

    integer: list[str]
    for_additions: list[str]


def quantize_inputs(path: str, quants: Mapping[str, InputQuant], tensors: Mapping[str, tuple[str, int]],
                    codes: Mapping[str, StoredCodes], state: Mapping[str, Any],
                    calibration: np.ndarray | None = None) -> QdqLayers:
    """Rewrite the ONNX file ``path`` in place: Q/DQ on the inputs of the layers of ``quants``,
    and the int8 weights onnxruntime fuses into integer kernels (see the module docstring).
    ``tensors``: ``{weight key: (ONNX tensor name, axis)}``; ``codes``: the stored codes of the
    weights written as integers; ``calibration``: inputs for the ranges of convolution outputs
    that only an addition reads. Without them no addition reads a quantized output: a
    convolution read by one stays on float operators."""
    keys = {layer: _weight_key(layer, state) for layer in quants}
    candidates = {key for layer, key in keys.items()
                  if key in codes and key in tensors and codes[key].bits <= WEIGHT_DQ_MAX_BITS
                  and _bias_fits(state, key, codes[key], float(input_qparams(quants[layer])[0]))}
    targets = {key: tensors[key][0] for key in candidates}
    outputs: dict[str, tuple[float, int]] = {}
    for_additions: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="slimtune-qdq-") as folder:
        probe = os.path.join(folder, "probe.onnx")
        while True:  # whether a layer fuses can depend on its neighbours': until onnxruntime fuses every candidate
            _rewrite(path, probe, quants, tensors, state, codes, candidates, outputs)
            fused = fused_weights(probe, candidates, targets)
            if fused == candidates:
                break
            plans = _output_plans(probe, candidates - fused, keys, tensors, outputs, calibration is not None)
            calibrate = {layer: plan[1] for layer, (plan, _) in plans.items() if plan[0] == CALIBRATE}
            if calibrate and calibration is not None:
                outputs.update(output_ranges(probe, calibrate, calibration))
            outputs.update({layer: plan for layer, (plan, _) in plans.items() if layer not in calibrate})
            for_additions |= {layer for layer, (_, for_addition) in plans.items() if for_addition}
            if plans:  # first try the convolutions that want their output quantized, with it
                continue
            candidates = fused
            outputs = {layer: r for layer, r in outputs.items() if keys[layer] in candidates}
    _rewrite(path, path, quants, tensors, state, codes, candidates, outputs)
    return QdqLayers(sorted(layer for layer, key in keys.items() if key in candidates),
                     sorted(for_additions & set(outputs)))


def _output_plans(path: str, unfused: set[str], keys: Mapping[str, str | None],
                  tensors: Mapping[str, tuple[str, int]], done: Mapping[str, Any],
                  additions: bool) -> dict[str, tuple[Any, bool]]:
    """``{layer: ((scale, zero point) or (CALIBRATE, its output tensor), whether an addition reads
    it)}`` for the convolutions (weight keys ``unfused``) of the file ``path`` that did not fuse
    for want of a ``QuantizeLinear`` on their output, can get one (:func:`_output_plan`) and have
    none yet."""
    import onnx

    graph = onnx.load(path).graph
    plans: dict[str, tuple[Any, bool]] = {}
    for layer, key in keys.items():
        if key in unfused and layer not in done:
            node = _consumer(graph, tensors[key][0], layer)
            found = _output_plan(graph, node, additions)
            if found is not None:
                plan, for_addition = found
                plans[layer] = ((CALIBRATE, _output_end(graph, node)) if plan == CALIBRATE else plan, for_addition)
    return plans


def _bias_fits(state: Mapping[str, Any], weight_key: str, stored: StoredCodes, input_scale: float) -> bool:
    """Whether the layer's bias (if any) has int32 codes at ``input_scale`` times its weight scales."""
    bias = state.get(weight_key.rpartition(".")[0] + ".bias")
    if bias is None:
        return True
    scales = np.float32(input_scale) * stored.scales.numpy().astype(np.float32)
    return bool(np.all(np.abs(np.asarray(bias, np.float64) / scales) < 2**31 - 1))

