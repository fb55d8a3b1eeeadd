"""The study spec: defaults, validation messages, fingerprint, and sampling a plan."""

from __future__ import annotations

import optuna
import pytest

from slimtune.spaces import CompressionPlan, SpecError, parse_spec, sample_plan, select_layers

from .conftest import digits_spec_dict


def test_defaults_are_filled_and_round_trip() -> None:
    spec = parse_spec({"study": {"name": "x"}, "model": {"preset": "lenet300"}, "data": {"preset": "mnist"}})
    assert spec.storage == "sqlite:///slimtune.db"
    assert spec.search.sampler == "tpe"
    assert spec.space.knobs["weight_bits"].choices == (2, 3, 4, 5, 6, 8, 32)
    again = parse_spec(spec.to_dict())
    assert again.to_dict() == spec.to_dict()
    assert again.fingerprint() == spec.fingerprint()


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("space", "weight_bits", {"choices": [1, 4]}, "space.weight_bits.choices"),
        ("space", "weight_bits", {"choices": [4, 33]}, "space.weight_bits.choices"),
        ("space", "act_bits", {"choices": [4, 8]}, "space.act_bits.choices"),
        ("space", "act_bits", {"fixed": 16}, "space.act_bits.fixed"),
        ("space", "prune_ratio", {"low": 0.1, "high": 1.0}, "space.prune_ratio.high"),
        ("space", "prune_ratio", {"fixed": 1.5}, "space.prune_ratio.fixed"),
        ("space", "kd_temperature", {"low": 0, "high": 2}, "space.kd_temperature.low"),
        ("space", "kd_alpha", {"tie": True}, "space.kd_alpha.tie"),
        ("search", "sampler", "cmaes", "search.sampler"),
        ("method", "prune", {"schedule": "sometimes"}, "method.prune.schedule"),
        ("runtime", "cache_mb", -1, "runtime.cache_mb"),
        ("study", "trials", 0, "study.trials"),
        ("finetune", "epochs", "two", "finetune.epochs"),
        ("finetune", "optimizer", "sgd", "finetune.optimizer"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(section: str, key: str, value: object, named: str) -> None:
    data = digits_spec_dict()
    data.setdefault(section, {})[key] = value
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert str(info.value).startswith(named)
    assert "allowed:" in str(info.value)


def test_model_needs_exactly_one_source() -> None:
    data = digits_spec_dict()
    data["model"] = {"preset": "lenet300", "factory": "pkg.mod:make"}
    with pytest.raises(SpecError, match="exactly one of 'preset' or 'factory'"):
        parse_spec(data)


def test_fingerprint_ignores_name_storage_and_trials_but_not_the_space() -> None:
    base = parse_spec(digits_spec_dict())
    renamed = parse_spec(digits_spec_dict(name="other", storage="sqlite:///x.db", trials=99))
    assert renamed.fingerprint() == base.fingerprint()
    changed = digits_spec_dict()
    changed["space"]["weight_bits"] = {"choices": [4, 8]}
    assert parse_spec(changed).fingerprint() != base.fingerprint()


def _plans(seed: int, n: int = 4) -> list[dict]:
    spec = parse_spec(digits_spec_dict())
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed))
    plans = []
    for _ in range(n):
        trial = study.ask()
        plans.append(sample_plan(trial, spec.space, ["conv1", "conv2", "fc1", "fc2"]).to_dict())
        study.tell(trial, [0.5, 100.0])
    return plans


def test_sampling_is_deterministic_per_seed() -> None:
    assert _plans(3) == _plans(3)
    assert _plans(3) != _plans(4)


def test_plan_is_explicit_per_layer_and_serializable() -> None:
    plan = CompressionPlan.from_dict(_plans(0, 1)[0])
    assert list(plan.layers) == ["conv1", "conv2", "fc1", "fc2"]
    for layer in plan.layers.values():
        assert 0.2 <= layer.prune_ratio <= 0.8
        assert layer.weight_bits in (2, 4, 8, 32)
        assert 1.0 <= layer.kd_temperature <= 4.0
    assert plan.lr == 2e-3


def test_tie_fix_and_per_layer_override() -> None:
    data = digits_spec_dict()
    data["space"]["weight_bits"] = {"choices": [2, 4, 8], "tie": True}
    data["space"]["kd_temperature"] = {"fixed": 3.0}
    data["space"]["layer"] = {"fc*": {"prune_ratio": 0.25}}
    spec = parse_spec(data)
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    plan = sample_plan(trial, spec.space, ["conv1", "conv2", "fc1", "fc2"])
    assert len({p.weight_bits for p in plan.layers.values()}) == 1
    assert {p.kd_temperature for p in plan.layers.values()} == {3.0}
    assert plan.layers["fc1"].prune_ratio == plan.layers["fc2"].prune_ratio == 0.25
    assert "weight_bits" in trial.params and "fc1.prune_ratio" not in trial.params
    assert "conv1.prune_ratio" in trial.params and "kd_temperature" not in trial.params


def test_layer_pattern_matching_nothing_is_an_error() -> None:
    data = digits_spec_dict()
    data["space"]["layers"] = ["fc*", "dense9"]
    spec = parse_spec(data)
    with pytest.raises(SpecError, match="space.layers: 'dense9' matches no layer"):
        select_layers(["conv1", "conv2", "fc1", "fc2"], spec.space)
    data["space"]["layers"] = ["*"]
    data["space"]["exclude"] = ["conv*"]
    assert select_layers(["conv1", "conv2", "fc1", "fc2"], parse_spec(data).space) == ["fc1", "fc2"]


def test_excluded_output_layer_still_gets_a_logit_temperature() -> None:
    data = digits_spec_dict()
    data["space"]["exclude"] = ["fc2"]
    spec = parse_spec(data)
    layers = select_layers(["conv1", "conv2", "fc1", "fc2"], spec.space)
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    plan = sample_plan(trial, spec.space, layers, output_layer="fc2")
    assert list(plan.layers) == ["conv1", "conv2", "fc1"]
    assert plan.logit_temperature is not None and 1.0 <= plan.logit_temperature <= 4.0
    assert trial.params["fc2.kd_temperature"] == plan.logit_temperature
    assert CompressionPlan.from_dict(plan.to_dict()) == plan
    # when the output layer is compressed, its own temperature is the logit temperature
    assert sample_plan(trial, spec.space, ["conv1", "fc2"], output_layer="fc2").logit_temperature is None
