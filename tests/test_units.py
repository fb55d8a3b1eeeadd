"""Unit pruning (the per-layer ``unit_ratio`` knob): whole neurons or channels dropped, and the
next layer's weights that read them pruned with them."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from slimtune.search import main
from slimtune.spaces import CompressionPlan, LayerPlan, ModelSpec, SpecError, parse_spec, sample_plan
from slimtune.studies import get_blob, keys, open_storage
from slimtune.trainers import (
    PruneMask, apply_plan, bake, build_datamodule, build_model, evaluate, model_from_meta, pack_model, unit_keeps,
    unpack_model,
)

from .conftest import SPEC_TOML, digits_spec_dict, without_seeds


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12), nn.ReLU(), nn.Linear(12, 4))


def _plan(layers: dict[str, tuple[float, int, float]]) -> CompressionPlan:
    """``{layer: (prune_ratio, bits, unit_ratio)}``."""
    return CompressionPlan({n: LayerPlan(prune_ratio=p, weight_bits=b, kd_temperature=2.0, rank_ratio=1.0, unit_ratio=u)
                            for n, (p, b, u) in layers.items()}, kd_alpha=0.9, feature_kd_weight=0.0, lr=1e-3)


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach()


def test_dropped_units_lose_their_weights_and_the_next_layers_weights_reading_them() -> None:
    model = _mlp()
    teacher_w2, teacher_w4 = _weight(model, "2").clone(), _weight(model, "4").clone()
    apply_plan(model, _plan({"0": (0.25, 32, 0.5), "2": (0.0, 32, 0.5), "4": (0.0, 32, 0.5)}))
    w0, w2, w4 = _weight(model, "0"), _weight(model, "2"), _weight(model, "4")
    dropped0 = (w0 == 0).all(dim=1)
    # layer 0 keeps the 16 units whose outgoing weights (the columns of layer 2) are largest
    expected = torch.zeros(32, dtype=torch.bool)
    expected[teacher_w2.norm(dim=0).argsort(descending=True)[:16]] = True
    assert torch.equal(~dropped0, expected)
    assert (w2[:, dropped0] == 0).all()  # the next layer no longer reads the dropped units
    # prune_ratio 0.25 is met within the kept units: here the dropped half already exceeds it
    assert int((w0 == 0).sum()) == 16 * 16
    # layer 2 (prune_ratio 0) drops 6 of its 12 units, and layer 4 stops reading them
    dropped2 = (w2 == 0).all(dim=1)
    assert int(dropped2.sum()) == 6 and (w4[:, dropped2] == 0).all()
    kept2 = torch.zeros(12, dtype=torch.bool)
    kept2[teacher_w4.norm(dim=0).argsort(descending=True)[:6]] = True
    assert torch.equal(~dropped2, kept2)
    # the logits layer has no next layer: every class stays
    assert not (w4 == 0).all(dim=1).any()


def test_the_planned_ratio_is_chosen_among_the_kept_units_weights() -> None:
    plan = _plan({"0": (0.75, 32, 0.5), "2": (0.0, 32, 1.0)})
    kept, _ = unit_keeps(_mlp(), plan)["0"]
    model = apply_plan(_mlp(), plan)
    w0 = _weight(model, "0")
    assert int(kept.sum()) == 16 and (w0[~kept] == 0).all()
    assert int((w0 == 0).sum()) == round(0.75 * w0.numel())  # exactly the plan: 384 zeros
    assert int((w0[kept] != 0).sum()) == 128


def test_the_network_no_longer_depends_on_the_dropped_units() -> None:
    plan = _plan({"0": (0.3, 4, 0.4), "2": (0.2, 4, 1.0), "4": (0.0, 8, 1.0)})
    dropped = ~unit_keeps(_mlp(), plan)["0"][0]
    baked = bake(apply_plan(_mlp(), plan))
    assert int(dropped.sum()) == 19  # 32 - round(0.4 * 32)
    x = torch.randn(64, 16)
    before = baked(x)
    with torch.no_grad():
        baked[0].bias[dropped] += 5.0  # whatever a dropped unit outputs, nothing reads it
    assert torch.equal(baked(x), before)


def test_a_convolution_feeding_a_linear_drops_channels_and_their_flattened_blocks() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(preset="cnn-digits"))
    apply_plan(model, _plan({"conv2": (0.0, 8, 0.25), "fc1": (0.5, 32, 1.0)}))
    conv, fc = _weight(model, "conv2"), _weight(model, "fc1")
    dropped = (conv == 0).flatten(1).all(dim=1)
    assert int(dropped.sum()) == 24  # 32 channels, 8 kept
    blocks = (fc == 0).view(64, 32, 16).all(dim=2).all(dim=0)  # fc1 reads 16 positions per channel
    assert torch.equal(blocks, dropped)
    assert int((fc == 0).sum()) == 24 * 16 * 64  # the dropped blocks alone exceed the plan's half


def test_units_are_scored_with_the_teachers_input_rms() -> None:
    model = _mlp()
    w2 = _weight(model, "2")
    rms = torch.ones(32)
    favourite = int(w2.norm(dim=0).argmin())  # the weakest outgoing weights ...
    rms[favourite] = 1e3  # ... but by far the largest activation
    keeps = unit_keeps(model, _plan({"0": (0.0, 32, 1 / 32), "2": (0.0, 32, 1.0)}), {"2": rms})
    kept, consumers = keeps["0"]
    assert consumers == ("2",) and kept.nonzero().flatten().tolist() == [favourite]


def test_reselected_masks_never_revive_a_dropped_unit() -> None:
    model = _mlp()
    apply_plan(model, _plan({"0": (0.5, 32, 0.5), "2": (0.5, 32, 1.0)}))
    for name in ("0", "2"):
        module = model.get_submodule(name)
        mask = next(p for p in module.parametrizations["weight"] if isinstance(p, PruneMask))
        before = mask.allowed.clone()
        mask.reselect(module.parametrizations["weight"].original, 0.0)  # a gradual ramp's first step
        assert torch.equal(mask.mask, before)  # everything allowed is kept, nothing else


def test_a_unit_pruned_model_packs_and_reads_back_exactly() -> None:
    model = _mlp()
    apply_plan(model, _plan({"0": (0.6, 3, 0.5), "2": (0.5, 5, 0.5), "4": (0.0, 8, 1.0)}),
               options={"quantize": {"quantizer": "lsq"}})
    blob = pack_model(model, meta={"model": {"preset": "demo"}})
    state, _ = unpack_model(blob)
    baked = bake(model).state_dict()
    assert all(torch.equal(state[k], baked[k]) for k in baked)


# ---- the knob in the spec and the sampler -------------------------------------------------------

def test_unit_ratio_defaults_off_and_is_never_sampled_for_the_logits_layer() -> None:
    # since 0.2 the knob is searched by default (low = 0.3, high = 1.0); its neutral value {fixed = 1.0} turns it off
    default = parse_spec(digits_spec_dict())
    assert (default.space.knobs["unit_ratio"].low, default.space.knobs["unit_ratio"].high) == (0.3, 1.0)
    off = digits_spec_dict()
    off["space"]["unit_ratio"] = {"fixed": 1.0}
    spec = parse_spec(off)
    assert spec.space.knobs["unit_ratio"].fixed == 1.0
    assert spec.fingerprint() == "26ccb2a165962500"  # off: as before the knob existed (left out of the fingerprint)
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    plan = sample_plan(trial, spec.space, ["conv1", "conv2", "fc1", "fc2"], "fc2")
    assert not any("unit_ratio" in p for p in trial.params)
    assert {p.unit_ratio for p in plan.layers.values()} == {1.0}
    stored = plan.to_dict()
    for layer in stored["layers"].values():
        del layer["unit_ratio"]
    assert CompressionPlan.from_dict(stored) == plan  # plans stored before the knob existed

    searched = digits_spec_dict()
    searched["space"]["unit_ratio"] = {"low": 0.3, "high": 1.0}
    spec = parse_spec(searched)
    assert spec.fingerprint() != "26ccb2a165962500" and spec.fingerprint() == default.fingerprint()
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    plan = sample_plan(trial, spec.space, ["conv1", "conv2", "fc1", "fc2"], "fc2")
    assert {"conv1.unit_ratio", "conv2.unit_ratio", "fc1.unit_ratio"} <= set(trial.params)
    assert "fc2.unit_ratio" not in trial.params and plan.layers["fc2"].unit_ratio == 1.0
    assert 0.3 <= plan.layers["fc1"].unit_ratio <= 1.0


@pytest.mark.parametrize(("value", "named"), [({"low": 0.0, "high": 1.0}, "space.unit_ratio.low"),
                                              ({"fixed": 1.5}, "space.unit_ratio.fixed")])
def test_bad_unit_ratio_names_the_key(value: dict, named: str) -> None:
    data = digits_spec_dict()
    data["space"]["unit_ratio"] = value
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert str(info.value).startswith(named) and "share of a layer's output units" in str(info.value)


# ---- end to end through the CLI -------------------------------------------------------------------

def test_search_with_unit_ratio_records_plans_and_honest_artifacts(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(without_seeds(SPEC_TOML).replace('name = "digits-test"', 'name = "digits-units"')
                         + "unit_ratio = { low = 0.3, high = 0.8 }\n")
    url = f"sqlite:///{tmp_path / 'units.db'}"
    assert main(["search", str(spec_path), "--storage", url, "--quiet", "--trials", "3"]) == 0
    study = optuna.load_study(study_name="digits-units", storage=url)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete
    storage = open_storage(url)
    dm = build_datamodule(parse_spec(study.user_attrs[keys.SPEC]).data)
    for trial in complete:
        plan = trial.user_attrs[keys.TRIAL_PLAN]["layers"]
        assert plan["fc2"]["unit_ratio"] == 1.0 and "fc2.unit_ratio" not in trial.params
        state, meta = unpack_model(get_blob(storage, "digits-units", keys.artifact_blob_key(trial.number)))
        kept = max(1, round(trial.params["fc1.unit_ratio"] * 64))
        assert int((state["fc1.weight"] != 0).any(dim=1).sum()) <= kept
        assert int((state["fc2.weight"] == 0).all(dim=0).sum()) >= 64 - kept  # fc2 stops reading them
        model = model_from_meta(meta)
        model.load_state_dict(state)
        assert evaluate(model, dm.val_dataloader()) == trial.values[0]
    capsys.readouterr()
    assert main(["pareto", "--study", "digits-units", "--storage", url, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and "fc1.unit_ratio" in rows[0]
    report = tmp_path / "report.html"
    assert main(["report", "--study", "digits-units", "--storage", url, "--out", str(report)]) == 0
    assert "units kept (plan unit_ratio)" in report.read_text()
