"""Models beyond chains (``examples/architectures.py``): batch norm folded, residual channels
pruned together, attention / recurrent / embedding / Conv1d weights compressed, feature
distillation that skips what it cannot tap, and each architecture end to end (CLI and Python)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

import slimtune
from examples.architectures import DigitsTransformer, PixelEmbedding, ResidualCNN, SequenceGRU
from slimtune.search import main
from slimtune.spaces import CompressionPlan, LayerPlan, parse_spec
from slimtune.studies import keys
from slimtune.trainers import (
    DigitsDataModule, FakeQuant, OnnxModel, TrialContext, apply_plan, bake, compressible_layers, evaluate, load_artifact,
    pack_model, run_trial, unit_groups, unpack_codes, unpack_model, weight_tensors,
)
from slimtune.trainers._fold import fold_batchnorm

from .conftest import SPEC_TOML, digits_spec_dict

ARCHITECTURES = (ResidualCNN, DigitsTransformer, SequenceGRU, PixelEmbedding)


def _plan(names: list[str], **knobs: float) -> CompressionPlan:
    return CompressionPlan({n: LayerPlan(**knobs) for n in names}, kd_alpha=0.9, feature_kd_weight=0.0, lr=1e-3)


def _with_statistics(model: nn.Module) -> nn.Module:
    """Batch norms with running statistics and affine parameters that are not the identity."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model.eval()


def test_batch_norm_is_folded_into_its_convolution_and_the_artifact_rebuilds_without_it() -> None:
    torch.manual_seed(0)
    model = _with_statistics(ResidualCNN())
    x = torch.rand(16, 1, 8, 8)
    before = model(x)
    folded = fold_batchnorm(copy.deepcopy(model))
    assert folded == {"stem.1": "stem.0", "block1.bn1": "block1.conv1", "block1.bn2": "block1.conv2",
                      "block2.bn1": "block2.conv1", "block2.bn2": "block2.conv2", "block2.project.1": "block2.project.0"}
    plain = copy.deepcopy(model)
    fold_batchnorm(plain)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert torch.allclose(plain(x), before, atol=1e-5)  # the same function

    # on a compressed model (learned 4-bit scales): the integer codes stay, the scales take the norm
    compressed = apply_plan(copy.deepcopy(model), _plan(compressible_layers(model), weight_bits=4, prune_ratio=0.3),
                            options={"quantize": {"quantizer": "lsq"}}).eval()
    quantized = compressed(x)
    codes = {n: compressed.get_submodule(n).parametrizations["weight"][-1].codes_and_scales(
        compressed.get_submodule(n).parametrizations["weight"].original)[0] for n in folded.values()}
    fold_batchnorm(compressed, folded)
    after = compressed(x)
    assert (after - quantized).abs().max() < 2e-2 * quantized.abs().max()  # float16 scales: a rounding apart
    for name, before_codes in codes.items():
        module = compressed.get_submodule(name)
        now = module.parametrizations["weight"][-1].codes_and_scales(module.parametrizations["weight"].original)[0]
        assert (now != before_codes).float().mean() < 0.01, name
    blob = pack_model(compressed, meta={"model": {"factory": "examples.architectures:ResidualCNN"},
                                        "folded_batchnorm": folded})
    state, meta = unpack_model(blob)
    assert not any("running" in k or "bn" in k for k in state)  # no norm is stored
    restored, _ = load_artifact(blob, template=_with_statistics(ResidualCNN()))
    assert torch.equal(restored(x), bake(compressed).eval()(x))


def test_channels_that_meet_at_an_addition_are_dropped_together() -> None:
    torch.manual_seed(0)
    model = _with_statistics(ResidualCNN())
    fold_batchnorm(model)
    groups = {tuple(g.producers): g for g in unit_groups(model)[0]}
    assert groups[("block1.conv2", "stem.0")].consumers == ["block1.conv1", "block2.conv1", "block2.project.0"]
    assert groups[("block2.conv2", "block2.project.0")].consumers == ["head"]
    assert groups[("head",)].blocked_by == "the model's output"
    apply_plan(model, _plan(compressible_layers(model), unit_ratio=0.5))
    baked = bake(model).eval()

    def dropped(name: str) -> torch.Tensor:
        return (baked.get_submodule(name).weight == 0).flatten(1).all(dim=1)

    assert int(dropped("stem.0").sum()) == 8 and torch.equal(dropped("stem.0"), dropped("block1.conv2"))
    assert torch.equal(dropped("block2.conv2"), dropped("block2.project.0")) and int(dropped("block2.conv2").sum()) == 16
    for consumer in ("block1.conv1", "block2.conv1", "block2.project.0"):
        assert (baked.get_submodule(consumer).weight[:, dropped("stem.0")] == 0).all()
    x = torch.rand(16, 1, 8, 8)
    out = baked(x)
    with torch.no_grad():  # whatever the dropped channels carry, nothing reads it
        for name in ("stem.0", "block1.conv2"):
            baked.get_submodule(name).bias[dropped("stem.0")] += 3.0
        baked.get_submodule("block2.conv2").bias[dropped("block2.conv2")] += 3.0
    assert torch.allclose(baked(x), out, atol=1e-5)


def test_a_group_with_a_layer_outside_the_plan_keeps_its_units_and_a_model_fx_cannot_trace_says_why() -> None:
    model = _with_statistics(ResidualCNN())
    fold_batchnorm(model)
    names = [n for n in compressible_layers(model) if n != "stem.0"]
    apply_plan(model, _plan(names, unit_ratio=0.5))
    baked = bake(model)
    for name in ("stem.0", "block1.conv2"):  # the group stem.0 belongs to keeps every channel
        assert not (baked.get_submodule(name).weight == 0).flatten(1).all(dim=1).any()
    assert (baked.get_submodule("block1.conv1").weight == 0).flatten(1).all(dim=1).sum() == 8  # its own group drops

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) if x.sum() > 0 else x)

    groups, reason = unit_groups(Branchy())
    assert groups == [] and reason is not None and reason.startswith("torch.fx cannot trace the model's forward")

    class Shared(nn.Module):  # one layer applied twice
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(torch.relu(self.a(x)))))

    groups, _ = unit_groups(Shared())
    assert {g.blocked_by for g in groups if g.producers == ["a"]} == {"a is called more than once"}

    class TwoReads(nn.Module):  # one layer reading the units of two others, separately
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.a(x))) + self.c(torch.relu(self.b(x)))

    groups, _ = unit_groups(TwoReads())
    assert {g.blocked_by for g in groups if g.producers in (["a"], ["b"])} == {"c also reads other units"}

    class Rows(nn.Module):  # a mean over one of two spatial dimensions: a Linear then reads positions
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean(2))

    groups, _ = unit_groups(Rows())
    assert next(g for g in groups if g.producers == ["conv"]).blocked_by == "mean reads them"


def test_a_layer_left_out_of_the_plan_keeps_the_units_it_reads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    apply_plan(model, _plan(["0"], unit_ratio=0.5))  # "2", its reader, is not compressed
    assert not (bake(model)[0].weight == 0).all(dim=1).any()


def test_a_norm_after_a_linear_layer_on_sequences_is_not_folded() -> None:
    class Tokens(nn.Module):  # Linear on (N, T, F), then BatchNorm1d over T
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm, self.head = nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Linear(25, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.fc(x)).flatten(1))

    from slimtune.trainers._fold import foldable_pairs

    assert foldable_pairs(Tokens(), torch.zeros(2, 5, 5)) == {}
    flat = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    assert foldable_pairs(flat, torch.zeros(2, 5)) == {"1": "0"} and foldable_pairs(flat) == {}
    groups, _ = unit_groups(flat, torch.zeros(2, 5))
    assert next(g for g in groups if g.producers == ["0"]).consumers == ["3"]


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda a: a.__name__)
def test_every_weight_tensor_of_every_layer_is_pruned_and_quantized_and_packs_exactly(architecture: type) -> None:
    torch.manual_seed(0)
    model = fold_and_eval(architecture())
    names = compressible_layers(model)
    apply_plan(model, _plan(names, prune_ratio=0.5, weight_bits=4))
    for name in names:
        for module, tensor in weight_tensors(model.get_submodule(name)):
            value = getattr(module, tensor).detach()
            assert int((value == 0).sum()) >= round(0.5 * value.numel()), (name, tensor)
            assert any(isinstance(p, FakeQuant) for p in module.parametrizations[tensor]), (name, tensor)
            levels = [row[row != 0].unique().numel() for row in value.flatten(1)]
            assert max(levels) <= 15, (name, tensor)  # 4-bit codes: at most 15 nonzero levels per row
    blob = pack_model(model, meta={})
    state, _ = unpack_model(blob)
    kinds = {e["name"]: e["kind"] for e in json.loads(_manifest(blob))["tensors"]}
    baked = bake(copy.deepcopy(model)).eval()
    assert all(torch.equal(state[k], v) for k, v in baked.state_dict().items())
    for name in names:
        for module, tensor in weight_tensors(baked.get_submodule(name)):
            assert kinds[f"{name}.{tensor}"] == "quant", (name, tensor)
    x = torch.rand(8, 1, 8, 8)
    fresh = fold_and_eval(architecture())
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), baked(x)) and torch.equal(fresh(x), baked(x))  # and again: nothing kept stale


def fold_and_eval(model: nn.Module) -> nn.Module:
    fold_batchnorm(model.eval())
    return model


def _manifest(blob: bytes) -> bytes:
    import lzma
    import struct

    from slimtune.trainers._pack import _LZMA_FILTERS

    payload = lzma.decompress(blob[5:], format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    (length,) = struct.unpack_from("<I", payload)
    return payload[4: 4 + length]


def _spec(factory: str, **space: object) -> dict:
    data = digits_spec_dict(trials=2)
    data["model"] = {"factory": factory}
    data["teacher"]["epochs"] = 6
    data["space"].update(space)
    return data


def _spec_file(folder: Path, factory: str, *space_lines: str) -> Path:
    """The tests' digits spec as a TOML file, with another model and more ``[space]`` lines."""
    text = (SPEC_TOML.replace('preset = "cnn-digits"', f'factory = "{factory}"').replace("trials = 3", "trials = 2")
            .replace("epochs = 8", "epochs = 6").replace("[space]\n", "[space]\n" + "".join(f"{l}\n" for l in space_lines)))
    path = folder / "spec.toml"
    path.write_text(text)
    return path


def test_feature_distillation_leaves_out_what_the_forward_pass_never_calls() -> None:
    spec = parse_spec(_spec("examples.architectures:DigitsTransformer", feature_kd_weight={"fixed": 0.5}))
    torch.manual_seed(0)
    teacher = DigitsTransformer().eval()
    context = TrialContext.create(spec, teacher, datamodule=DigitsDataModule())
    assert context.untappable == {
        "position": "never called as a module (its parent uses its weights directly)",
        "encoder.layers.0.self_attn.out_proj": "never called as a module (its parent uses its weights directly)",
        "encoder.layers.1.self_attn.out_proj": "never called as a module (its parent uses its weights directly)",
    }
    assert "encoder.layers.0.self_attn" in context.feature_layers and "position" not in context.feature_layers
    plan = CompressionPlan({n: LayerPlan(prune_ratio=0.3, weight_bits=8, kd_temperature=2.0)
                            for n in context.layer_names}, kd_alpha=0.9, feature_kd_weight=0.5, lr=1e-3)
    result = run_trial(context, plan, seed=0)
    assert result.size_bytes == len(result.artifact) > 0 and 0 < result.val_accuracy <= 1


def test_patterns_naming_modules_no_method_compresses_are_said_and_refused_when_nothing_is_left(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = _spec_file(tmp_path, "examples.architectures:DigitsTransformer", 'layers = ["*norm*"]')
    assert main(["search", str(spec), "--storage", url, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "space.layers: ['*norm*'] selects no layer" in err and "Traceback" not in err
    assert not (tmp_path / "s.db").exists()

    spec = _spec_file(tmp_path, "examples.architectures:DigitsTransformer", 'layers = ["*norm*", "head"]')
    assert main(["search", str(spec), "--storage", url, "--quiet", "--trials", "1", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert ("space.layers matches 4 modules no method compresses, stored as they are: "
            "encoder.layers.0.norm1 (LayerNorm), encoder.layers.0.norm2 (LayerNorm)") in err, err
    study = optuna.load_study(study_name="digits-test", storage=url)
    assert list(study.trials[0].user_attrs[keys.TRIAL_PLAN]["layers"]) == ["head"]


@pytest.mark.parametrize("architecture", [ResidualCNN, SequenceGRU], ids=lambda a: a.__name__)
def test_a_user_architecture_end_to_end_from_the_command_line(architecture: type, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec_file(tmp_path, f"examples.architectures:{architecture.__name__}",
                      "unit_ratio = { low = 0.5, high = 1.0 }", "feature_kd_weight = { fixed = 0.3 }")
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["search", str(spec), "--storage", url, "--quiet", "--threads", "1"]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done, [t.user_attrs.get("fail_reason") for t in study.trials]
    out = tmp_path / "m.slim"
    assert main(["export", "--study", "digits-test", "--storage", url, "--trial", str(done[0].number),
                 "--out", str(out), "--onnx", str(tmp_path / "m.onnx"), "--trust", "examples"]) == 0
    assert out.stat().st_size == done[0].values[1]
    stored = len(unpack_codes(out.read_bytes()))  # every weight the artifact stores as integers, in ONNX too
    printed = capsys.readouterr().out
    assert stored and f"{stored} weight tensors as integer codes" in printed and "as floats" not in printed
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json", "--trust", "examples"]) == 0
    measured = json.loads(capsys.readouterr().out)["accuracy"]
    assert measured == pytest.approx(done[0].user_attrs[keys.TRIAL_TEST_ACCURACY], abs=1e-12)
    if architecture is ResidualCNN:
        _, meta = unpack_model(out.read_bytes())
        assert len(meta["folded_batchnorm"]) == 6


@pytest.mark.parametrize("architecture", [DigitsTransformer, PixelEmbedding], ids=lambda a: a.__name__)
def test_a_user_architecture_end_to_end_from_python(architecture: type, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = architecture()
    data = DigitsDataModule()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):  # the user's own training
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = slimtune.search(model, data, study="arch", storage=url, trials=2, threads=1, max_accuracy_drop=0.5,
                            space={"prune_ratio": {"low": 0.2, "high": 0.6}, "weight_bits": {"choices": [4, 8]},
                                   "feature_kd_weight": {"fixed": 0.3}},
                            finetune={"epochs": 1, "batch_size": 64})
    small, record = study.best(max_drop=0.5)
    assert evaluate(small, data.test_dataloader()) == pytest.approx(record.test_accuracy, abs=1e-12)
    assert record.compression_ratio > 4  # every weight matrix is quantized: 8 bits alone give 4x
    path = study.export(tmp_path / "m.slim", max_drop=0.5, onnx=tmp_path / "m.onnx", onnx_float=tmp_path / "f.onnx")
    assert path.stat().st_size == record.size_bytes
    onnx_size, float_size = (tmp_path / "m.onnx").stat().st_size, (tmp_path / "f.onnx").stat().st_size
    assert float_size >= 3 * onnx_size, (float_size, onnx_size)  # attention and embedding weights as integers
    for name in ("m.onnx", "f.onnx"):
        assert evaluate(OnnxModel(tmp_path / name), data.val_dataloader()) == pytest.approx(record.val_accuracy, abs=1e-3)
