"""Which weights survive and what the artifact keeps of them: activation-weighted masks
(``[method.prune] activation_power``), network-surgery masks (``[method.prune] schedule = "dynamic"``)
and float16 biases (``[method.quantize] bias_bits = 16``), each reachable from a spec."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from slimtune.search import main
from slimtune.spaces import CompressionPlan, LayerPlan, SpecError, parse_spec, regular_sections
from slimtune.studies import get_blob, keys
from slimtune.trainers import (
    DistillationModule, DynamicPruning, HalfPrecision, apply_plan, bake, evaluate_artifact, importance,
    layer_input_scales, pack_model, quiet_trainer, unpack_model,
)

from .conftest import SPEC_TOML, digits_spec_dict, toy_model_and_loader


def _plan(ratio: float, bits: int = 32, layers: tuple[str, ...] = ("0", "2")) -> CompressionPlan:
    return CompressionPlan({name: LayerPlan(prune_ratio=ratio, weight_bits=bits, kd_temperature=2.0)
                            for name in layers}, kd_alpha=1.0, feature_kd_weight=0.0, lr=1e-2)


def test_input_scales_are_the_rms_of_each_input_feature_and_channel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(50, 2, 6, 6)
    x[:, 1] *= 3.0  # channel 1 is three times as loud
    scales = layer_input_scales(model, ["0", "2"], x, power=1.0, chunk=7)  # chunks must not change the result
    assert torch.allclose(scales["0"], x.pow(2).mean(dim=(0, 2, 3)).sqrt(), rtol=1e-5)
    hidden = model[1](model[0](x)).detach()
    assert torch.allclose(scales["2"], hidden.pow(2).mean(dim=0).sqrt(), rtol=1e-5)
    half = layer_input_scales(model, ["0"], x, power=0.5)
    assert torch.allclose(half["0"], scales["0"].sqrt(), rtol=1e-5)
    assert model.training  # measured in eval mode, left as it was


def test_activation_power_prunes_weights_on_dead_inputs_first() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight[:, 0] = 5.0  # the largest weights sit on an input that is always 0
    x = torch.randn(100, 8)
    x[:, 0] = 0.0
    model = nn.Sequential(layer)
    by_magnitude = apply_plan(copy.deepcopy(model), _plan(0.25, layers=("0",)))
    assert bool((by_magnitude[0].parametrizations["weight"][0].mask[:, 0] == 1).all())
    scales = layer_input_scales(model, ["0"], x, power=1.0)
    by_activation = apply_plan(copy.deepcopy(model), _plan(0.25, layers=("0",)),
                               options={"prune": {"activation_power": 1.0}}, input_rms=scales)
    mask = by_activation[0].parametrizations["weight"][0].mask
    assert bool((mask[:, 0] == 0).all()) and int((mask == 0).sum()) == 8  # same ratio, dead input gone
    assert torch.equal(importance(layer.weight, None), layer.weight.detach().abs())


def test_dynamic_pruning_lets_pruned_weights_back_then_freezes_the_mask() -> None:
    model, loader = toy_model_and_loader()
    teacher = copy.deepcopy(model).eval()
    student = apply_plan(model, _plan(0.75))
    first = student.get_submodule("0").parametrizations["weight"]
    start_mask = first[0].mask.clone()
    surgery = DynamicPruning(student, update_steps=10, every=2)
    assert first[0].straight_through
    student(torch.randn(4, 16)).sum().backward()
    assert bool((first.original.grad[start_mask == 0] != 0).any())  # pruned weights get a gradient
    first.original.grad = None
    masks: list[torch.Tensor] = []
    flags: list[bool] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            masks.append(first[0].mask.clone())
            flags.append(first[0].straight_through)

    module = DistillationModule(student, lr=5e-2, kd_alpha=1.0, logit_temperature=2.0, feature_kd_weight=0.0,
                                feature_temperatures={}, teacher=teacher)
    quiet_trainer(2, seed=0, callbacks=[surgery, Watch()]).fit(module, train_dataloaders=loader)
    zeros = int((start_mask == 0).sum())
    assert all(int((m == 0).sum()) == zeros for m in masks)  # the planned ratio at every step
    assert any(not torch.equal(m, start_mask) for m in masks[:10])  # the mask moved while allowed
    assert all(torch.equal(m, masks[10]) for m in masks[10:])  # and is frozen after update_steps
    assert flags[:10] == [True] * 10 and not any(flags[10:]) and not first[0].straight_through
    assert torch.equal(student.get_submodule("0").weight == 0, masks[-1] == 0)


def test_half_biases_train_as_float16_values_and_pack_in_two_bytes() -> None:
    model, _ = toy_model_and_loader()
    plan = _plan(0.5, bits=4)
    wide = apply_plan(copy.deepcopy(model), plan)
    half = apply_plan(copy.deepcopy(model), plan, options={"quantize": {"bias_bits": 16}})
    bias = half.get_submodule("0").bias
    assert torch.equal(bias, bias.to(torch.float16).to(torch.float32)) and bias.dtype == torch.float32
    half(torch.randn(3, 16)).sum().backward()
    assert half.get_submodule("0").parametrizations["bias"].original.grad is not None  # identity gradient
    blob = pack_model(half)
    assert blob[4] == 3 and pack_model(wide)[4] == 2  # version 3 only when it holds float16 entries
    assert len(blob) < len(pack_model(wide))
    state, _ = unpack_model(blob)
    baked = bake(copy.deepcopy(half)).state_dict()
    assert state.keys() == baked.keys()
    assert all(torch.equal(state[k], baked[k]) and state[k].dtype == torch.float32 for k in state)
    assert torch.equal(HalfPrecision()(torch.tensor([1e9])), torch.tensor([65504.0]))
    with pytest.raises(ValueError, match="bias_bits"):  # the spec parser checks the value (apply_plan no longer)
        parse_spec({**digits_spec_dict(), "method": {"quantize": {"bias_bits": 8}}})

    class Doubled(nn.Module):
        def forward(self, value: torch.Tensor) -> torch.Tensor:
            return 2 * value

    rounded = half.get_submodule("2").bias.detach().clone()
    torch.nn.utils.parametrize.register_parametrization(half.get_submodule("2"), "bias", Doubled())
    # a bias it cannot store as float16 is not written wrong: a last parametrization without a codec is
    # written as floats, its parametrizations baked in (since 0.2; it used to be refused)
    state, _ = unpack_model(pack_model(half))
    assert torch.equal(state["2.bias"], 2 * rounded)
    assert torch.equal(state["2.bias"], bake(copy.deepcopy(half)).state_dict()["2.bias"])


def test_mask_settings_are_validated_and_neutral_values_keep_the_fingerprint() -> None:
    base = parse_spec(digits_spec_dict())
    # today's defaults (activation-weighted masks, float16 biases) written out keep the fingerprint
    written = {**digits_spec_dict(), "method": {"prune": {"activation_power": 0.5}, "quantize": {"bias_bits": 16}}}
    assert parse_spec(written).fingerprint() == base.fingerprint()
    # the neutral values (magnitude masks, float32 biases, amax scales: the plain methods, as before the
    # settings existed) are left out of the fingerprint, so old studies keep theirs
    neutral = parse_spec({**digits_spec_dict(), "method": {"prune": {"activation_power": 0.0},
                                                           "quantize": {"bias_bits": 32, "quantizer": "amax"}}})
    for section in regular_sections():
        if section.name.startswith("method."):
            name = section.name.split(".", 1)[1]
            assert section.fingerprint_part(neutral.to_dict()["method"][name]) == {}, section.name
    assert neutral.fingerprint() != base.fingerprint()
    changed = {**digits_spec_dict(), "method": {"prune": {"activation_power": 1.0, "schedule": "dynamic"},
                                                "quantize": {"bias_bits": 32}}}
    spec = parse_spec(changed)
    assert (spec.method("prune").activation_power, spec.method("quantize").bias_bits,
            spec.method("prune").schedule) == (1.0, 32, "dynamic")
    assert spec.fingerprint() != base.fingerprint()
    for key, value, allowed in [("prune.activation_power", -1, "[0, 4]"), ("prune.activation_power", "x", "4"),
                                ("quantize.bias_bits", 8, "32, 16"), ("quantize.bias_bits", True, "32, 16"),
                                ("prune.schedule", "surgery", '"oneshot", "gradual", "dynamic"')]:
        method, option = key.split(".")
        bad = {**digits_spec_dict(), "method": {method: {option: value}}}
        with pytest.raises(SpecError, match=f"method.{key}") as err:
            parse_spec(bad)
        assert allowed in str(err.value)


def test_activation_masks_dynamic_schedule_and_half_biases_end_to_end(tmp_path: Path) -> None:
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(SPEC_TOML.replace(
        "[finetune]\nepochs = 1",
        "[method.prune]\nschedule = \"dynamic\"\nactivation_power = 1.0\n\n[method.quantize]\nbias_bits = 16\n\n"
        "[finetune]\nepochs = 1"))
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["search", str(spec_file), "--storage", url, "--trials", "3", "--quiet"]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete
    storage = optuna.storages.RDBStorage(url)
    for trial in complete:
        blob = get_blob(storage, "digits-test", keys.artifact_blob_key(trial.number))
        assert blob is not None and len(blob) == trial.values[1] and blob[4] == 3
        state, _ = unpack_model(blob)
        for name in trial.user_attrs[keys.TRIAL_PLAN]["layers"]:
            bias = state[f"{name}.bias"]
            assert torch.equal(bias, bias.to(torch.float16).to(torch.float32))
    best = complete[0]  # what a user gets back from the artifact is what the study recorded
    artifact = get_blob(storage, "digits-test", keys.artifact_blob_key(best.number))
    assert evaluate_artifact(artifact, split="val") == best.values[0]
    assert evaluate_artifact(artifact, split="test") == best.user_attrs[keys.TRIAL_TEST_ACCURACY]
