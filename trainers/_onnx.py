"""Exporting a trial's model to ONNX: integer weights, thinner layers, checked in onnxruntime.

:func:`export_artifact_onnx` turns an artifact into an ONNX file that deploys. By default
(``integer=True``) it is the model the artifact stores, as integers:

- the idle units of ``unit_ratio`` are cut out (:func:`~slimtune.trainers.thin_units`), in
  multiples of :data:`UNIT_MULTIPLE`, so a unit-pruned layer is exported with the shape it
  kept; low-rank layers are their two thin factors and batch norms are folded, as in the
  artifact;
- every weight the artifact stores as integer codes is written as those codes (``INT4`` up to 4
  bits, opset 21; ``INT8`` up to 8; ``INT16`` above) and the trial's own per-channel scales,
  turned back into the float weight by a ``Cast`` and a ``Mul`` in front of the operator that
  reads it (why not ``DequantizeLinear``: see :func:`_integer_weights`); the codes are exactly
  the artifact's. Unstructured zeros stay zeros (ONNX has no sparse weights that onnxruntime
  runs faster); the ``.slim`` file stays the smallest storage.

``integer=False`` writes the dequantized float model instead. Either way the file is checked,
not hoped: onnxruntime must reproduce PyTorch's logits on one validation batch
(:func:`check_onnx`) and score the whole validation split within :data:`SCORE_TOLERANCE` of the
score recorded for the trial; anything else is an error naming both numbers.

Example:
    >>> from slimtune.trainers import DigitsCNN, pack_model
    >>> blob = pack_model(DigitsCNN(), meta={"model": {"preset": "cnn-digits"}, "data": {"preset": "digits"}})
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    >>> export_artifact_onnx(blob, path).integer_weights  # nothing was quantized: floats
    0
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from slimtune.spaces import SpecError, metric_of

from ._bench import bench_onnx
from ._data import prepare_datamodule
from ._export import artifact_datamodule, example_batch, first_inputs, load_artifact
from ._onnx_qdq import QdqLayers, quantize_inputs, weight_tensor_names
from ._pack import StoredCodes, unpack_codes
from ._teacher import evaluate
from ._thin import thin_units
from .methods import float_inputs, input_quantized
from .methods.quantize import dequantize

ONNX_ATOL = 1e-4  # allowed |onnxruntime - PyTorch| per logit, relative to max(1, max |logit|)
SCORE_TOLERANCE = 1e-3  # allowed |onnxruntime's validation score - the recorded one| (0.1 point of accuracy)
QDQ_ATOL = 0.05  # with int8 layer inputs: allowed |onnxruntime - PyTorch| per logit, relative as ONNX_ATOL
QDQ_CLASS_CHANGES = 0.02  # with int8 layer inputs: the share of a batch allowed another class
QDQ_SCORE_TOLERANCE = 3e-3  # with int8 layer inputs: allowed score difference (0.3 point of accuracy)
# Units kept per layer, in multiples of: onnxruntime's blocked (NCHWc) convolutions fall back to
# slower kernels for widths that are not multiples of 8 (digits CNN, batch 256, one thread: cut
# to 28 and 40 units 1.60 ms, to 32 and 40 units 1.25 ms, not cut 1.25 ms).
UNIT_MULTIPLE = 8
INTEGER_OPSET = 21  # the first opset with INT4 tensors (and Cast from them)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's notes (missing torchvision ops, deprecations) for the length of an export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _to_onnx(model: nn.Module, x: torch.Tensor, path: str, opset: int | None = None) -> None:
    """Write ``model`` as ONNX (one file): a dynamic batch axis if the model allows, else ``x``'s shape."""
    common: dict[str, Any] = dict(input_names=["input"], output_names=["logits"], external_data=False,
                                  verbose=False, opset_version=opset)
    with _quiet_exporter():
        try:
            torch.onnx.export(model, (x,), path, dynamic_shapes=({0: torch.export.Dim("batch")},), **common)
        except Exception:
            torch.onnx.export(model, (x,), path, **common)


def _session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModel(nn.Module):
    """An onnxruntime session called like a model (CPU tensors in and out), so that slimtune's
    ``evaluate`` scores an ONNX file as it scores a model; a file exported with a fixed batch
    size gets its inputs in chunks of that size (the last one padded)."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        super().__init__()
        self.session = _session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        first = self.session.get_inputs()[0].shape[0]
        self.batch = first if isinstance(first, int) else None

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy()
        if self.batch is None or len(array) == self.batch:
            return torch.from_numpy(self.run(array))
        outputs = []
        for start in range(0, len(array), self.batch):
            chunk = array[start: start + self.batch]
            padded = np.concatenate([chunk, np.repeat(chunk[:1], self.batch - len(chunk), axis=0)])
            outputs.append(self.run(padded)[: len(chunk)])
        return torch.from_numpy(np.concatenate(outputs))


def check_onnx(path: str | os.PathLike[str], x: torch.Tensor, expected: torch.Tensor,
               quantized_inputs: bool = False) -> float:
    """Run the ONNX file with onnxruntime on ``x`` and compare with ``expected`` (PyTorch's logits).

    Returns the max abs difference; raises ``ValueError`` when it exceeds :data:`ONNX_ATOL`
    (times ``max(1, max |logit|)``) or when any input gets a different class (logits of
    several classes). With ``quantized_inputs`` (int8 layer inputs, which onnxruntime's integer
    kernels requantize in their own float order: a code may land one step away), the bounds are
    :data:`QDQ_ATOL` and :data:`QDQ_CLASS_CHANGES`.
    """
    got = OnnxModel(path)(x).numpy()
    want = expected.detach().cpu().numpy()
    if got.shape != want.shape:
        raise ValueError(f"onnxruntime returned shape {got.shape}, PyTorch {want.shape}")
    diff = float(np.abs(got - want).max()) if want.size else 0.0
    largest = float(np.abs(want).max()) if want.size else 1.0
    tolerance = (QDQ_ATOL if quantized_inputs else ONNX_ATOL) * max(1.0, largest)
    if not diff <= tolerance:
        raise ValueError(f"max abs diff {diff:.3g} exceeds {tolerance:.3g}")
    differ = int((got.argmax(1) != want.argmax(1)).sum()) if want.ndim == 2 and want.shape[1] > 1 else 0
    allowed = int(QDQ_CLASS_CHANGES * want.shape[0]) if quantized_inputs else 0
    if differ > allowed:  # classes: one output per sample (a regression) has none to compare
        raise ValueError(f"{differ} of {want.shape[0]} inputs get a different class (allowed: {allowed})")
    return diff


def _exported(model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str], option: str,
              opset: int | None = None) -> None:
    try:
        _to_onnx(model, example, str(path), opset)
    except Exception as exc:
        raise SpecError(option, str(path), "a model that torch.onnx.export supports",
                        f"cannot be exported ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]})") from None


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str]) -> float:
    """Write ``model`` to ``path`` as float ONNX and check it with onnxruntime against PyTorch on
    ``example``. Returns the max abs difference of the logits. Raises :class:`SpecError` when the
    model cannot be exported and ``ValueError`` when onnxruntime disagrees (see :func:`check_onnx`).
    """
    model = model.eval()
    with torch.no_grad():
        expected = model(example)
    _exported(model, example, path, "--onnx")
    return check_onnx(path, example, expected)


def _code_tensor(name: str, codes: torch.Tensor, bits: int) -> Any:
    """An ONNX initializer of ``codes``: INT4 (two per byte, low nibble first) up to 4 bits, INT8
    up to 8, INT16 above."""
    from onnx import TensorProto, helper, numpy_helper

    values = np.ascontiguousarray(codes.numpy())
    if bits <= 4:
        nibbles = (values.flatten().astype(np.int64) & 0xF).astype(np.uint8)
        if len(nibbles) % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        return helper.make_tensor(name, TensorProto.INT4, list(values.shape), packed.tobytes(), raw=True)
    return numpy_helper.from_array(values.astype(np.int8 if bits <= 8 else np.int16), name)


def _thin_codes(model: nn.Module, codes: dict[str, StoredCodes], kept: dict[str, torch.Tensor]) -> dict[str, StoredCodes]:
    """The codes of the thinned model's integer weights: the stored scales of the rows it kept,
    and the codes that give its weights exactly (checked)."""
    state = model.state_dict()
    out: dict[str, StoredCodes] = {}
    for name, stored in codes.items():
        if name not in state:
            continue
        rows = kept.get(name.rpartition(".")[0])
        scales = stored.scales if rows is None else stored.scales[rows]
        weight = state[name].detach().float()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        thin = torch.round(weight / scales.view(shape)).to(torch.int64)
        if not torch.equal(dequantize(thin, scales), weight):
            raise ValueError(f"{name}: the thinned weight is not its stored codes times their scales")
        out[name] = StoredCodes(thin, scales, stored.bits)
    return out


def _placement(array: np.ndarray, weight: np.ndarray, stored: StoredCodes) -> tuple[np.ndarray, np.ndarray, int] | None:
    """``(codes, scales, axis)`` that give the float initializer ``array`` exactly from ``stored``
    (the codes of ``weight``), when ``array`` is ``weight`` as the exporter laid it out: itself,
    transposed (a ``MatMul`` reads ``W^T``), or its rows reordered under leading 1s (a ``GRU``'s
    gates); ``None`` when it is none of them."""
    codes, scales = stored.codes.numpy(), stored.scales.numpy().astype(np.float32)
    if array.ndim == 2 and weight.ndim == 2 and array.shape == weight.T.shape and np.array_equal(array, weight.T):
        return codes.T, scales, 1
    rows = weight.shape[0]
    if array.size != weight.size or rows not in array.shape:
        return None
    axis = array.shape.index(rows)
    if any(d != 1 for d in array.shape[:axis]):
        return None
    unused: dict[bytes, list[int]] = {}
    for index, row in enumerate(weight.reshape(rows, -1)):
        unused.setdefault(row.tobytes(), []).append(index)
    order = []
    for row in array.reshape(rows, -1):
        matches = unused.get(row.tobytes())
        if not matches:
            return None
        order.append(matches.pop(0))
    return codes.reshape(rows, -1)[order].reshape(array.shape), scales[order], axis


def _per_axis(scales: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return scales.reshape(shape)


def _integer_weights(path: str, codes: dict[str, StoredCodes],
                     weights: dict[str, np.ndarray]) -> dict[str, tuple[str, int]]:
    """Rewrite the float ONNX at ``path``: each float initializer that is a weight of ``codes``
    (by name, or laid out otherwise: :func:`_placement`) becomes its codes and scales, and a
    ``Cast`` to float and a ``Mul`` by the scales give the initializer's name back. Returns
    ``{weight: (ONNX tensor name, axis of its output channels)}`` of the weights written as
    integers; the exporter's notes on every node (stack traces) are dropped.

    Why not ``DequantizeLinear``: onnxruntime runs ``DequantizeLinear`` into ``Conv`` at every
    call (3x slower than float on the digits CNN) and fuses it into ``MatMul`` as ``MatMulNBits``
    with int8 activations (another score: 83.84 % against 83.57 % recorded on a small
    Transformer), while it folds ``Cast`` and ``Mul`` of initializers into float weights when it
    loads the file: the small file then runs the recorded arithmetic at float speed.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path)
    graph = model.graph
    nodes: list[Any] = []
    done: dict[str, tuple[str, int]] = {}
    pending = dict(codes)
    for initializer in list(graph.initializer):
        if initializer.data_type != TensorProto.FLOAT or len(initializer.dims) < 2 or not pending:
            continue
        array = numpy_helper.to_array(initializer)
        candidates = [initializer.name] if initializer.name in pending else list(pending)
        for name in candidates:
            placed = _placement(array, weights[name], pending[name])
            if placed is None:
                continue
            codes_array, scales, axis = placed
            scales = _per_axis(scales, codes_array.ndim, axis)
            if not np.array_equal(codes_array.astype(np.float32) * scales, array):
                continue
            target = initializer.name
            graph.initializer.remove(initializer)
            graph.initializer.extend([_code_tensor(f"{target}.codes", torch.from_numpy(codes_array), pending[name].bits),
                                      numpy_helper.from_array(scales, f"{target}.scales")])
            nodes += [helper.make_node("Cast", [f"{target}.codes"], [f"{target}.float"], to=TensorProto.FLOAT,
                                       name=f"cast {name}"),
                      helper.make_node("Mul", [f"{target}.float", f"{target}.scales"], [target], name=f"scale {name}")]
            done[name] = (target, axis)
            del pending[name]
            break
    for node in reversed(nodes):  # first: they read only initializers
        graph.node.insert(0, node)
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, path)
    return done


@dataclass
class OnnxExport:
    """What :func:`export_artifact_onnx` wrote and checked: the file's ``bytes``, the number of
    weights written as integer codes (``integer_weights``) and those of the weights the artifact
    stores as integers that the file holds as floats (``float_weights``), the layers it thinned (``thinned``: layer ->
    ``(units before, units kept)``), onnxruntime against PyTorch on one batch (``batch`` inputs,
    ``max_diff``), onnxruntime's validation metric (``val``; the ``recorded`` one, if given), the
    layers whose inputs it quantizes (``quantized_inputs``), those of them onnxruntime runs on
    integer kernels (``integer_inputs``) and those of these whose output an addition reads
    quantized (``outputs_for_additions``: a quantization not trained)."""

    path: str
    bytes: int
    integer_weights: int
    float_weights: list[str]
    thinned: dict[str, tuple[int, int]] = field(default_factory=dict)
    batch: int = 0
    max_diff: float = 0.0
    val: float | None = None
    recorded: float | None = None
    quantized_inputs: list[str] = field(default_factory=list)
    integer_inputs: list[str] = field(default_factory=list)
    outputs_for_additions: list[str] = field(default_factory=list)


def write_model_onnx(model: nn.Module, blob: bytes, x: torch.Tensor, path: str | os.PathLike[str], *,
                     integer: bool = True, option: str = "--onnx",
                     calibration: torch.Tensor | None = None) -> OnnxExport:
    """Write ``model`` (the artifact ``blob``'s, read back; thinned in place when ``integer``) to
    ``path`` as ONNX and check its logits on the inputs ``x`` in onnxruntime (no score yet).
    Layers trained with int8 inputs get them as ``QuantizeLinear`` nodes (``_onnx_qdq``); a
    convolution among them whose output an addition reads fuses too, the addition reading it
    quantized at a neighbour's trained range or one calibrated on the ``calibration`` inputs
    (training inputs). Without them, or when the file fails the check so, such a convolution
    stays on float operators."""
    with torch.no_grad():
        expected = model(x)
    thinned: dict[str, tuple[int, int]] = {}
    codes: dict[str, StoredCodes] = {}
    if integer:
        before = {n: m.weight.shape[0] for n, m in model.named_modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor)}
        kept = thin_units(model, x, UNIT_MULTIPLE)
        thinned = {layer: (before[layer], len(index)) for layer, index in kept.items()}
        codes = _thin_codes(model, unpack_codes(blob), kept)
    with float_inputs(model) as quants:
        _exported(model.eval(), x, path, option, INTEGER_OPSET if codes or quants else None)
    state = {n: t.detach().cpu().numpy() for n, t in model.state_dict().items()}
    done = _integer_weights(str(path), codes, {n: state[n] for n in codes}) if codes else {}
    base = Path(path).read_bytes()
    for inputs in ([calibration, None] if quants and calibration is not None else [None]):
        Path(path).write_bytes(base)
        layers = QdqLayers([], [])
        if quants:
            wanted = {n: state[n] for n in (f"{layer}.weight" for layer in quants) if n in state}
            tensors = {**weight_tensor_names(str(path), {n: w for n, w in wanted.items() if n not in done}), **done}
            try:
                layers = quantize_inputs(str(path), quants, tensors, {n: codes[n] for n in done}, state,
                                         None if inputs is None else inputs.cpu().numpy())
            except ValueError as exc:
                raise SpecError(option, str(path), "a model whose quantized layer inputs are found in its ONNX graph",
                                str(exc)) from None
        result = OnnxExport(str(path), os.path.getsize(path), len(done), sorted(set(codes) - set(done)), thinned,
                            len(x), quantized_inputs=sorted(quants), integer_inputs=layers.integer,
                            outputs_for_additions=layers.for_additions)
        try:
            result.max_diff = check_onnx(path, x, expected, quantized_inputs=bool(quants))
        except ValueError as exc:
            if layers.for_additions:  # what the additions read quantized (untrained) costs too much: without it
                continue
            raise SpecError(option, str(path), "an ONNX model that reproduces PyTorch's logits (same classes)",
                            f"fails the onnxruntime check on {len(x)} validation inputs: {exc}") from None
        return result
    raise AssertionError("unreachable: the last try quantizes no output for an addition")


def export_artifact_onnx(blob: bytes, path: str | os.PathLike[str], *, integer: bool = True,
                         recorded_score: float | None = None, name: str = "the artifact",
                         option: str = "--onnx", template: nn.Module | None = None,
                         datamodule: Any = None) -> OnnxExport:
    """Write the model of the artifact ``blob`` to ``path`` as ONNX (integer weights and thinned
    layers unless ``integer=False``; see the module docstring) and check it in onnxruntime: the
    logits of one validation batch, and the validation metric against ``recorded_score`` (the
    trial's score, higher is better; for a logged metric, which onnxruntime cannot run, the task's
    built-in metric against the PyTorch model's). Raises :class:`SpecError` (``option`` names the setting)
    when the model cannot be exported or a check fails. ``template`` and ``datamodule``: the
    uncompressed model and the data module, for a study searched from Python objects (else the
    artifact's references are built)."""
    model, meta = load_artifact(blob, name, template=template)
    dm = prepare_datamodule(datamodule) if datamodule is not None else artifact_datamodule(meta, name)
    metric, against = metric_of(meta), "the recorded"
    if metric.logged:  # onnxruntime runs no validation_step: the logged value is checked in PyTorch, the file
        if recorded_score is not None:  # on the task's own metric against PyTorch's (before any thinning)
            _check_score(evaluate(model, dm.val_dataloader(), metric), recorded_score, metric, option, name,
                         "the PyTorch model read from the artifact")
        metric, against = metric.computed, "PyTorch's"
        recorded_score = metric.score(evaluate(model, dm.val_dataloader(), metric.name))
    calibration = calibration_inputs(dm) if integer and input_quantized(model) else None
    untouched = copy.deepcopy(model) if calibration is not None else model
    result = write_model_onnx(model, blob, example_batch(dm), path, integer=integer, option=option,
                              calibration=calibration)
    result.val = evaluate(OnnxModel(path), dm.val_dataloader(), metric.name)
    result.recorded = metric.value(recorded_score)
    if recorded_score is not None:
        tolerance = QDQ_SCORE_TOLERANCE if result.quantized_inputs else SCORE_TOLERANCE
        if result.outputs_for_additions and abs(metric.score(result.val) - recorded_score) > tolerance:
            # what the additions read quantized (untrained) costs too much: again without it
            result = write_model_onnx(untouched, blob, example_batch(dm), path, integer=integer, option=option)
            result.val = evaluate(OnnxModel(path), dm.val_dataloader(), metric.name)
            result.recorded = metric.value(recorded_score)
        _check_score(result.val, recorded_score, metric, option, str(path), "onnxruntime", against, tolerance)
    return result


CALIBRATION_INPUTS = 512  # training inputs behind an output range the export calibrates (as quantize_static's)


def calibration_inputs(dm: Any) -> torch.Tensor:
    """The first :data:`CALIBRATION_INPUTS` training inputs (the seeded order of the training loader)."""
    return first_inputs(dm.train_dataloader(), CALIBRATION_INPUTS)


def _check_score(value: float, expected_score: float, metric: Any, option: str, what: str, runner: str,
                 against: str = "the recorded", tolerance: float = SCORE_TOLERANCE) -> None:
    """A :class:`SpecError` unless the metric ``value`` scores within ``tolerance`` of ``expected_score``."""
    if not abs(metric.score(value) - expected_score) <= tolerance:
        raise SpecError(option, what, f"a model whose validation {metric.label} is within "
                        f"{metric.drop_text(tolerance)} of {against}",
                        f"scores {metric.format(value)} in {runner} against {against} "
                        f"{metric.format(metric.value(expected_score))}")


DEPLOY_RUNS = 50  # timed calls behind a trial's latency_ms (after the warm-up calls)


def deploy_figures(model: nn.Module, blob: bytes, dm: Any, batch: int) -> dict[str, float]:
    """What the trial's integer ONNX weighs and how fast it runs here: ``{"onnx_bytes",
    "latency_ms"}`` (onnxruntime, one thread, the median of :data:`DEPLOY_RUNS` calls at
    ``batch`` validation inputs, in a fresh process); ``model`` is the artifact's, read back
    (a copy is thinned)."""
    x = example_batch(dm)
    with tempfile.TemporaryDirectory(prefix="slimtune-deploy-") as folder:
        path = os.path.join(folder, "trial.onnx")
        written = write_model_onnx(copy.deepcopy(model).eval(), blob, x, path,
                                   calibration=calibration_inputs(dm) if input_quantized(model) else None)
        inputs = first_inputs(dm.val_dataloader(), batch).cpu().numpy()
        timing = bench_onnx(path, inputs, (batch,), threads=1, runs=DEPLOY_RUNS)
    return {"onnx_bytes": float(written.bytes), "latency_ms": timing.latency_ms[batch][0]}


