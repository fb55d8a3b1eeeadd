"""``act_bits = 8``: a layer's input as int8 codes, trained with fake quantization over an observed
range, stored in the artifact, and exported as QDQ that onnxruntime runs on integer kernels."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime
import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

import slimtune
from slimtune.search import main
from slimtune.spaces import CompressionPlan, LayerPlan, parse_spec, sample_plan
from slimtune.trainers import (
    DigitsCNN, DigitsDataModule, OnnxModel, apply_plan, artifact_datamodule, evaluate, export_artifact_onnx,
    load_artifact, pack_model,
)
from slimtune.trainers._onnx import QDQ_SCORE_TOLERANCE, write_model_onnx
from slimtune.trainers.methods import (
    InputQuant, attach_input_quant, input_qparams, input_quantized, method,
)
from slimtune.trainers.methods._inputs import RANGE_MOMENTUM

from .conftest import SPEC_TOML, digits_spec_dict, searched
from .test_python_api import SETTINGS, SPACE, SmallNet, _trained

STUDY = "digits-test"
# every layer's input int8; weights at 8 bits but conv1's float (its input then runs in float
# operators, the others on integer kernels); half the units of the hidden layers
SPEC = SPEC_TOML.replace('weight_bits = { choices = [2, 4, 8, 32] }',
                         'weight_bits = 8\nunit_ratio = 0.5\nact_bits = 8').replace(
    "trials = 3", "trials = 2") + '\n[space.layer."conv1"]\nweight_bits = 32\n'
META = {"model": {"preset": "cnn-digits"}, "data": {"preset": "digits"}}


def _plan(model: nn.Module, **knobs: object) -> CompressionPlan:
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return CompressionPlan({n: LayerPlan(**knobs) for n in layers}, kd_alpha=0.9, feature_kd_weight=0.0, lr=1e-3)


def test_the_range_is_observed_in_training_then_frozen_and_always_holds_zero() -> None:
    quant = InputQuant()
    quant.train()(torch.tensor([0.5, 2.0]))
    assert (float(quant.low), float(quant.high)) == (0.0, 2.0)  # the first batch, widened to hold 0
    quant(torch.tensor([-1.0, 4.0]))
    assert float(quant.low) == pytest.approx(-RANGE_MOMENTUM)
    assert float(quant.high) == pytest.approx(2.0 + 2.0 * RANGE_MOMENTUM)
    frozen = (float(quant.low), float(quant.high))
    x = torch.linspace(-3.0, 5.0, 101)
    out = quant.eval()(x)
    assert (float(quant.low), float(quant.high)) == frozen  # evaluation does not move the range
    scale, zero_point = input_qparams(quant)
    codes = torch.round(out / scale) + zero_point
    assert torch.allclose(out, (codes - zero_point) * scale, atol=1e-6)  # every output is on the int8 grid
    assert int(codes.min()) == -128 and int(codes.max()) == 127  # clipped to the range's codes
    assert float(quant(torch.zeros(3)).abs().max()) == 0.0  # zero is exact


def test_the_gradient_passes_inside_the_range_only() -> None:
    quant = InputQuant()
    quant.train()(torch.tensor([0.0, 1.0]))
    quant.eval()
    x = torch.tensor([0.3, 0.7, 5.0, -2.0], requires_grad=True)
    quant(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_act_bits_reaches_the_linear_and_conv_layers_the_model_calls_and_is_inert_elsewhere() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.gru = nn.GRU(8, 8, batch_first=True)
            self.conv = nn.Conv1d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embed(tokens)
            x, _ = self.attn(x, x, x)
            x, _ = self.gru(x)
            x = self.conv(x.transpose(1, 2)).mean(2)
            return self.head(x)

    model = Mixed()
    names = ["embed", "attn", "attn.out_proj", "gru", "conv", "head"]
    inert = method("quantize").inert_layers(model, names, torch.randint(0, 10, (2, 5)))["act_bits"]
    assert inert == {"embed", "attn", "attn.out_proj", "gru"}  # indices, packed matrices, a projection never called


def test_the_artifact_stores_the_range_and_reads_back_the_same_model() -> None:
    torch.manual_seed(0)
    model = apply_plan(DigitsCNN(), _plan(DigitsCNN(), weight_bits=4, act_bits=8))
    assert sorted(input_quantized(model)) == ["conv1", "conv2", "fc1", "fc2"]
    model.train()(torch.randn(32, 64))  # observes every layer's input range
    model.eval()
    x = torch.randn(16, 64)
    blob = pack_model(model, meta=dict(META))
    restored, meta = load_artifact(blob, "test")
    assert meta["quantized_inputs"] == {"conv1": 8, "conv2": 8, "fc1": 8, "fc2": 8}
    assert torch.equal(restored(x), model(x))  # the stored ranges and codes give the same outputs, bit for bit
    unquantized = len(pack_model(apply_plan(DigitsCNN(), _plan(DigitsCNN(), weight_bits=4)), meta=dict(META)))
    assert len(blob) > unquantized  # the ranges are stored, and counted


def test_a_layer_without_a_tensor_input_is_left_alone() -> None:
    layer = nn.Linear(3, 2)
    attach_input_quant(layer)
    assert layer(torch.ones(1, 3)).shape == (1, 2)
    assert layer.input_quant(torch.tensor([1, 2])).tolist() == [1, 2]  # integers (indices) pass through


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return searched(tmp_path_factory.mktemp("acts"), SPEC)


def _optimized_ops(path: Path, tmp_path: Path) -> list[str]:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def test_a_trial_with_int8_inputs_exports_integer_kernels_at_its_recorded_accuracy(
        db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trials = optuna.load_study(study_name=STUDY, storage=db).get_trials(states=(TrialState.COMPLETE,))
    assert trials, "the digits search with a 50-point floor completes trials"
    trial = trials[0]
    slim, integer, floats = tmp_path / "m.slim", tmp_path / "m.onnx", tmp_path / "f.onnx"
    capsys.readouterr()
    assert main(["export", "--study", STUDY, "--storage", db, "--trial", str(trial.number), "--out", str(slim),
                 "--onnx", str(integer), "--onnx-float", str(floats)]) == 0
    out = capsys.readouterr().out
    # conv1 keeps float weights: its input is quantized in float operators; the other three run on integer kernels
    assert "4 layers with int8 inputs (3 on onnxruntime's integer kernels)" in out, out
    assert "4 layers with int8 inputs (0 on onnxruntime's integer kernels)" in out, out  # the float export
    ops = _optimized_ops(integer, tmp_path)
    assert ops.count("QLinearConv") == 1 and ops.count("QGemm") == 2, ops
    assert "QLinearConv" not in _optimized_ops(floats, tmp_path)

    model, meta = load_artifact(slim.read_bytes(), "m.slim")
    assert sorted(input_quantized(model)) == ["conv1", "conv2", "fc1", "fc2"]
    assert all(q.observed for q in input_quantized(model).values())  # ranges trained, and stored
    val = artifact_datamodule(meta, "m.slim").val_dataloader()
    assert abs(evaluate(OnnxModel(integer), val) - trial.values[0]) <= QDQ_SCORE_TOLERANCE
    assert evaluate(OnnxModel(floats), val) == pytest.approx(trial.values[0], abs=1e-9)  # float operators: exact


def test_a_low_rank_layer_quantizes_what_its_first_factor_reads_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plan = _plan(DigitsCNN(), weight_bits=8, act_bits=8)
    plan = CompressionPlan({**plan.layers, "fc1": LayerPlan(weight_bits=8, act_bits=8, rank_ratio=0.25)},
                           kd_alpha=0.9, feature_kd_weight=0.0, lr=1e-3)
    model = apply_plan(DigitsCNN(), plan)
    calls = []
    model.fc1[0].input_quant.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    model.train()(torch.randn(32, 64))
    assert calls == [torch.Size([32, 512])]  # the factor's input, once: not the layer's output
    model.eval()
    blob = pack_model(model, meta=dict(META))
    restored, meta = load_artifact(blob, "test")
    assert meta["quantized_inputs"]["fc1.0"] == 8 and "fc1" not in meta["quantized_inputs"]
    x = torch.randn(64, 64)
    done = write_model_onnx(restored, blob, x, tmp_path / "m.onnx")
    assert "fc1.0" in done.quantized_inputs


def test_act_bits_is_inert_on_a_layer_called_twice_or_sharing_its_weight() -> None:
    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.twice, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.twice(self.twice(self.b(self.a(x)))))

    inert = method("quantize").inert_layers(Reused(), ["a", "b", "twice", "head"], torch.randn(2, 4))["act_bits"]
    assert inert == {"a", "b", "twice"}


def test_the_integer_kernels_reported_are_those_onnxruntime_runs(tmp_path: Path) -> None:
    class Pooled(nn.Module):  # the last conv's output is averaged, not requantized: it cannot fuse
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x.view(-1, 1, 8, 8))))).mean((2, 3)))

    torch.manual_seed(0)
    model = apply_plan(Pooled(), _plan(Pooled(), weight_bits=8, act_bits=8))
    model.train()(torch.randn(64, 64))
    model.eval()
    blob = pack_model(model, meta=dict(META))
    restored, _ = load_artifact(blob, "test", template=Pooled())
    done = write_model_onnx(restored, blob, torch.randn(64, 64), tmp_path / "m.onnx")
    assert done.quantized_inputs == ["c1", "c2", "fc"]
    ops = _optimized_ops(tmp_path / "m.onnx", tmp_path)
    convs = [layer for layer in done.integer_inputs if layer.startswith("c")]
    assert ops.count("QLinearConv") == len(convs)
    assert ops.count("QGemm") + ops.count("QLinearMatMul") == len(done.integer_inputs) - len(convs)


class _Residual(nn.Module):
    """A stem, a block with an identity shortcut, a block with a projection, then a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.project, self.fc = nn.Conv2d(8, 16, 1, stride=2), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x.view(-1, 1, 8, 8)))
        x = torch.relu(self.a2(torch.relu(self.a1(x))) + x)
        x = torch.relu(self.b2(torch.relu(self.b1(x))) + self.project(x))
        return self.fc(x.mean((2, 3)))


def _trained_residual(batches: list[torch.Tensor]) -> tuple[nn.Module, bytes]:
    """A :class:`_Residual` with every weight and input int8, trained a step per batch (seed 0), and its artifact."""
    torch.manual_seed(0)
    model = apply_plan(_Residual(), _plan(_Residual(), weight_bits=8, act_bits=8))
    for batch in batches:
        model.train()(batch)
    model.eval()
    return model, pack_model(model, meta=dict(META))


def test_residual_blocks_run_on_integer_kernels_with_their_additions(tmp_path: Path) -> None:
    _, blob = _trained_residual([torch.rand(64, 64) for _ in range(3)])
    restored, _ = load_artifact(blob, "test", template=_Residual())
    x, calibration = torch.rand(64, 64), torch.rand(256, 64)
    done = write_model_onnx(restored, blob, x, tmp_path / "m.onnx", calibration=calibration)
    convs = ["a1", "a2", "b1", "b2", "project", "stem"]
    # every convolution, those before an addition too (their outputs quantized at calibrated ranges)
    assert done.integer_inputs == done.quantized_inputs == sorted(convs + ["fc"])
    ops = _optimized_ops(tmp_path / "m.onnx", tmp_path)
    assert ops.count("QLinearConv") == len(convs) and ops.count("QGemm") == 1, ops
    assert ops.count("QLinearAdd") == 1, ops  # the identity block's; the last one feeds a mean, in float
    with torch.no_grad():
        expected = restored(x)
    got = OnnxModel(tmp_path / "m.onnx")(x)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.95
    # the stem's output is read by a1 and the first addition: the addition reads it through a1's
    # trained quantizer; only what a convolution gives an addition alone gets a calibrated range
    scales = {i.name: float(onnx.numpy_helper.to_array(i)) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
              if i.name.endswith(".output.scale")}
    assert sorted(scales) == ["a2.output.scale", "b2.output.scale", "project.output.scale"]
    assert done.outputs_for_additions == ["a2", "b2", "project", "stem"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))  # a valid graph: its nodes in order
    seen: list[torch.Tensor] = []
    restored.a2.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        restored(calibration)
    low, high = min(float(seen[0].min()), 0.0), max(float(seen[0].max()), 0.0)
    assert scales["a2.output.scale"] == pytest.approx((high - low) / 255, rel=1e-4)  # min..max of those inputs


def test_a_calibrated_range_that_fails_the_check_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import slimtune.trainers._onnx_qdq as qdq

    _, blob = _trained_residual([torch.rand(64, 64) for _ in range(3)])
    x = torch.rand(64, 64)
    plain = write_model_onnx(load_artifact(blob, "test", template=_Residual())[0], blob, x, tmp_path / "n.onnx")
    # ranges that clip what the convolutions give the additions to almost nothing: the logits
    # fail the check, and the file is written again without them
    monkeypatch.setattr(qdq, "output_ranges", lambda path, layers, calibration: {k: (1e-6, -128) for k in layers})
    done = write_model_onnx(load_artifact(blob, "test", template=_Residual())[0], blob, x, tmp_path / "m.onnx",
                            calibration=torch.rand(256, 64))
    assert done.outputs_for_additions == [] and done.integer_inputs == plain.integer_inputs
    assert {"a2", "b2", "project", "stem"}.isdisjoint(done.integer_inputs) and "a1" in done.integer_inputs
    assert (tmp_path / "m.onnx").read_bytes() == (tmp_path / "n.onnx").read_bytes()


def test_a_file_whose_additions_cost_its_score_is_written_again_without_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import slimtune.trainers._onnx as exporter

    dm = DigitsDataModule()
    model, blob = _trained_residual([batch[0] for batch in list(dm.train_dataloader())[:5]])
    recorded = evaluate(model, dm.val_dataloader())
    scores = []

    def scored(runner: object, batches: object, *args: object) -> float:  # the first file scores 1 point low
        value = evaluate(runner, batches, *args)
        scores.append(value)
        return value - 0.01 if len(scores) == 1 else value

    monkeypatch.setattr(exporter, "evaluate", scored)
    done = export_artifact_onnx(blob, tmp_path / "m.onnx", recorded_score=recorded, template=_Residual(),
                                datamodule=dm)
    assert len(scores) == 2  # written twice: with the additions' int8 inputs, then without
    assert done.outputs_for_additions == [] and {"a2", "b2", "project", "stem"}.isdisjoint(done.integer_inputs)
    assert abs(done.val - recorded) <= QDQ_SCORE_TOLERANCE


def test_a_layer_on_float_operators_lets_the_layer_before_it_fuse_at_its_own_range(tmp_path: Path) -> None:
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(512, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x.view(-1, 1, 8, 8))))).flatten(1))

    torch.manual_seed(0)
    plan = _plan(Chain(), weight_bits=8, act_bits=8)
    plan = CompressionPlan({**plan.layers, "c2": LayerPlan(weight_bits=32, act_bits=8)}, kd_alpha=0.9,
                           feature_kd_weight=0.0, lr=1e-3)
    model = apply_plan(Chain(), plan)
    model.train()(torch.rand(64, 64))
    model.eval()
    blob = pack_model(model, meta=dict(META))
    restored, _ = load_artifact(blob, "test", template=Chain())
    done = write_model_onnx(restored, blob, torch.rand(64, 64), tmp_path / "m.onnx", calibration=None)
    # c2 keeps float weights (its input quantized in float operators); c1 writes codes at c2's
    # trained range, which c2 quantizes again to the same codes: no calibrated range is needed
    assert done.quantized_inputs == ["c1", "c2", "fc"] and done.integer_inputs == ["c1", "fc"]
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    fused_output = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.name == "quantize c1.output")
    assert float(values[fused_output.input[1]]) == float(values["c2.input.scale"])
    assert int(values[fused_output.input[2]]) - 128 == int(values["c2.input.zero"])
    assert _optimized_ops(tmp_path / "m.onnx", tmp_path).count("QLinearConv") == 1


def test_a_crafted_input_range_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = apply_plan(DigitsCNN(), _plan(DigitsCNN(), weight_bits=8, act_bits=8))
    model.train()(torch.randn(8, 64))
    model.fc1.input_quant.low.fill_(1.0)  # a range that leaves 0 out: no trial stores one
    path = tmp_path / "crafted.slim"
    path.write_bytes(pack_model(model.eval(), meta=dict(META)))
    capsys.readouterr()
    assert main(["evaluate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "layer 'fc1' stores the input range [1, " in err and "Traceback" not in err


def test_act_bits_is_searched_per_layer_and_left_float_where_inert() -> None:
    data = digits_spec_dict()
    data["space"]["act_bits"] = {"choices": [8, 32]}
    spec = parse_spec(data)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[str, set[int]] = {}
    for _ in range(12):
        trial = study.ask()
        plan = sample_plan(trial, spec.space, ["conv1", "conv2", "fc1", "fc2"], inert={"act_bits": {"conv1"}})
        for name, layer in plan.layers.items():
            seen.setdefault(name, set()).add(layer.act_bits)
        assert "conv1.act_bits" not in trial.params  # an inert layer adds no parameter
        study.tell(trial, 0.0)
    assert seen == {"conv1": {32}, "conv2": {8, 32}, "fc1": {8, 32}, "fc2": {8, 32}}


def test_from_python_a_model_object_with_int8_inputs_exports_integer_kernels(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    net = _trained(SmallNet())
    study = slimtune.search(net, DigitsDataModule(), study="api-int8", storage=url, trials=2,
                            space={**SPACE, "act_bits": 8}, **SETTINGS)
    model, record = study.best(max_drop=0.5)
    assert sorted(input_quantized(model)) == ["body.1", "body.3"]
    study.export(tmp_path / "m.slim", max_drop=0.5, onnx=tmp_path / "m.onnx")
    assert _optimized_ops(tmp_path / "m.onnx", tmp_path).count("QGemm") == 2  # both layers on integer kernels
    onnx_val = evaluate(OnnxModel(tmp_path / "m.onnx"), DigitsDataModule().val_dataloader())
    assert abs(onnx_val - record.val_accuracy) <= QDQ_SCORE_TOLERANCE
