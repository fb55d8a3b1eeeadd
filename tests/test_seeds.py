"""Seeded plans: the sensitivity pass is measured once per study, stored, deterministic and reused
by a resumed search; its allocations and uniform plans run before the sampler's own, marked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from slimtune.search import main
from slimtune.spaces import estimated_drop, metric, parse_spec, seed_params, sensitivity_grid, uniform_params
from slimtune.studies import clean_sensitivity, keys, open_storage, sensitivity_figure, stored_sensitivity
from slimtune.trainers import PassOutOfTime

from .conftest import SPEC_TOML, digits_spec_dict


def _spec_with_space(space: dict[str, Any]) -> Any:
    data = digits_spec_dict()
    data["space"] = space
    return parse_spec(data)


def _spec_file(tmp_path: Path, trials: int) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(SPEC_TOML.replace("trials = 3", f"trials = {trials}").replace(
        "[space]", "[search.seed]\nplans = 2\nuniform = 1\nsamples = 200\n\n[space]"))
    return path


def test_the_grid_measures_each_searched_value_and_leaves_fixed_and_output_knobs_out() -> None:
    spec = _spec_with_space({"prune_ratio": {"low": 0.2, "high": 0.8}, "unit_ratio": {"fixed": 1.0},
                             "weight_bits": {"choices": [2, 4, 32]}, "lr": {"fixed": 2e-3}})
    grid = sensitivity_grid(spec.space, ["conv1", "fc"], output_layer="fc")
    # thirds of the range, then halved twice toward the strong end; 32 bits is neutral, unit_ratio fixed
    assert grid["fc"] == [("prune_ratio", 0.2), ("prune_ratio", 0.4), ("prune_ratio", 0.6), ("prune_ratio", 0.7),
                          ("prune_ratio", 0.75), ("prune_ratio", 0.8), ("weight_bits", 2), ("weight_bits", 4)]
    units = _spec_with_space({"unit_ratio": {"low": 0.4, "high": 1.0}, "lr": {"fixed": 2e-3}})
    assert [v for k, v in sensitivity_grid(units.space, ["conv1"])["conv1"] if k == "unit_ratio"] == [
        0.4, 0.45, 0.5, 0.6, 0.8]  # from 1.0 (neutral, all units kept) down: denser toward 0.4
    uniform = uniform_params(spec.space, ["conv1", "fc"], "fc", count=2)
    assert [u["conv1.weight_bits"] for u in uniform] == [4, 2] and uniform[0]["fc.prune_ratio"] == 0.6


def test_allocations_give_sensitive_layers_less_compression() -> None:
    spec = _spec_with_space({"prune_ratio": {"fixed": 0.0}, "weight_bits": {"choices": [2, 8, 32]},
                             "lr": {"fixed": 2e-3}})
    points = {  # layer a loses a lot at 2 bits, b nothing; both save the same bytes
        "a": [{"knob": "weight_bits", "value": 2, "score": 0.5, "bytes": 1000}, {"knob": "weight_bits", "value": 8,
                                                                                "score": 0.9, "bytes": 1600}],
        "b": [{"knob": "weight_bits", "value": 2, "score": 0.9, "bytes": 1000}, {"knob": "weight_bits", "value": 8,
                                                                                "score": 0.9, "bytes": 1600}]}
    sensitivity = {"base_score": 0.9, "base_bytes": 2000,
                   "layers": {name: {"bytes": 1000, "points": p} for name, p in points.items()}}
    plans = seed_params(sensitivity, spec.space, count=2)
    assert plans and all(p["b.weight_bits"] <= p["a.weight_bits"] for p in plans)
    assert any(p["a.weight_bits"] > 2 and p["b.weight_bits"] == 2 for p in plans)


def test_seeds_estimated_below_the_floor_are_left_out() -> None:
    spec = _spec_with_space({"prune_ratio": {"fixed": 0.0}, "weight_bits": {"choices": [2, 4, 8]},
                             "lr": {"fixed": 2e-3}})
    points = {  # 2 bits costs 0.3 in each layer before a fine-tune; 4 bits 0.01, 8 bits nothing
        name: [{"knob": "weight_bits", "value": bits, "score": 0.9 - drop, "bytes": 2000 - saved}
               for bits, drop, saved in ((2, 0.3, 900), (4, 0.01, 800), (8, 0.0, 700))] for name in ("a", "b")}
    sensitivity = {"base_score": 0.9, "base_bytes": 2000,
                   "layers": {name: {"bytes": 1000, "points": p} for name, p in points.items()}}
    unbounded = seed_params(sensitivity, spec.space, count=4)
    assert any(2 in p.values() for p in unbounded)  # without a floor the sweep reaches 2 bits
    capped = seed_params(sensitivity, spec.space, count=4, max_drop=0.05)
    assert capped and all(estimated_drop(sensitivity, p) <= 0.05 and 2 not in p.values() for p in capped)
    assert estimated_drop(sensitivity, {"a.weight_bits": 2, "b.weight_bits": 4}) == pytest.approx(0.31)
    uniform = uniform_params(spec.space, ["a", "b"], None, 3, sensitivity=sensitivity, max_drop=0.05)
    assert uniform and all(estimated_drop(sensitivity, p) <= 0.05 for p in uniform)
    assert len({tuple(sorted(p.items())) for p in uniform}) == len(uniform)  # no plan twice
    assert any(p["a.weight_bits"] == 2 for p in uniform_params(spec.space, ["a", "b"], None, 3))
    costly = json.loads(json.dumps(sensitivity))  # now 8 bits costs 0.01 per layer too
    for entry in costly["layers"].values():
        entry["points"][-1]["score"] = 0.89
    assert uniform_params(spec.space, ["a", "b"], None, 3, sensitivity=costly, max_drop=0.01) == []


def test_a_short_target_gets_seeds_spread_over_the_sizes_not_only_the_mildest() -> None:
    from types import SimpleNamespace

    from slimtune.search._seeding import _seeds

    data = digits_spec_dict()
    data["space"] = {"prune_ratio": {"fixed": 0.0}, "weight_bits": {"choices": [2, 3, 4, 5, 6, 8, 32]},
                     "lr": {"fixed": 2e-3}}
    data["search"] = {"seed": {"plans": 3, "uniform": 2}}
    spec = parse_spec(data)
    bits = [2, 3, 4, 5, 6, 8]
    sensitivity = {"base_score": 0.9, "dense_score": 0.9, "base_bytes": 4000, "layers": {
        name: {"bytes": 2000, "points": [
        {"knob": "weight_bits", "value": b, "score": 0.9 - cost * (8 - b) / 600, "bytes": 4000 - 2000 * (32 - b) // 32}
        for b in bits]} for name, cost in (("a", 1.0), ("b", 3.0))}}
    context = SimpleNamespace(spec=spec, layer_names=["a", "b"], output_layer=None, inert={})
    full, short = _seeds(sensitivity, context, room=100), _seeds(sensitivity, context, room=2)
    allocated = [p for kind, p in full if kind == "sensitivity"]
    assert len(allocated) == 3 and [kind for kind, _ in full].count("uniform") == 2
    assert [kind for kind, _ in short] == ["sensitivity", "sensitivity"]
    assert [p for _, p in short] == [allocated[0], allocated[-1]]  # the mildest and the strongest, not the two mildest


def test_the_pass_is_stored_once_deterministic_and_seeds_run_first_marked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["search", str(_spec_file(tmp_path, 5)), "--storage", url, "--quiet"]) == 0
    assert "sensitivity pass:" in capsys.readouterr().err
    storage = open_storage(url)
    first = stored_sensitivity(storage, "digits-test")
    assert first is not None and set(first["layers"]) == {"conv1", "conv2", "fc1", "fc2"}
    counts = {name: len(entry["points"]) for name, entry in first["layers"].items()}
    assert counts == {"conv1": 14, "conv2": 14, "fc1": 14, "fc2": 9}  # the logits keep units
    assert first["samples"] == 359  # samples = 200: digits' validation loader gives its 359 in one batch
    study = optuna.load_study(study_name="digits-test", storage=url)
    seeded = [t.user_attrs.get(keys.TRIAL_SEEDED) for t in study.trials]
    assert seeded == ["sensitivity", "sensitivity", "uniform", None, None]  # enqueued before sampled trials
    assert all(t.params["conv2.weight_bits"] in (2, 4, 8, 32) for t in study.trials)
    # the knobs a seed leaves to the sampler are sampled afresh for each enqueued trial
    assert len({t.params["conv1.kd_temperature"] for t in study.trials}) == 5

    assert main(["resume", "--study", "digits-test", "--storage", url, "--trials", "7", "--quiet"]) == 0
    assert "sensitivity pass:" not in capsys.readouterr().err  # reused, not measured again
    study = optuna.load_study(study_name="digits-test", storage=url)
    assert [t.user_attrs.get(keys.TRIAL_SEEDED) for t in study.trials][5:] == [None, None]
    assert stored_sensitivity(storage, "digits-test") == first
    assert main(["report", "--study", "digits-test", "--storage", url, "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert 'id="sensitivity-chart"' in page and f"It measured {sum(counts.values())} plans on 359 validation" in page

    other = tmp_path / "again"
    other.mkdir()
    again = f"sqlite:///{other / 's.db'}"
    assert main(["search", str(_spec_file(tmp_path, 2)), "--storage", again, "--quiet"]) == 0
    small = optuna.load_study(study_name="digits-test", storage=again)  # 3 seeds, a target of 2: 2 seeds run
    assert [t.user_attrs.get(keys.TRIAL_SEEDED) for t in small.trials] == ["sensitivity", "sensitivity"]
    second = stored_sensitivity(open_storage(again), "digits-test")
    assert second is not None
    for measured in (first, second):
        measured.pop("seconds")
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


def test_a_study_at_its_target_measures_no_pass_until_a_larger_target_leaves_room(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    unseeded = tmp_path / "off.toml"
    unseeded.write_text(SPEC_TOML.replace("trials = 3", "trials = 2").replace(
        "[space]", "[search.seed]\nplans = 0\nuniform = 0\n\n[space]"))
    assert main(["search", str(unseeded), "--storage", url, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(_spec_file(tmp_path, 2)), "--storage", url, "--quiet"]) == 0  # seeding on now
    assert "sensitivity pass:" not in capsys.readouterr().err  # no room for a seed: no pass
    assert stored_sensitivity(open_storage(url), "digits-test") is None
    assert main(["search", str(_spec_file(tmp_path, 3)), "--storage", url, "--quiet"]) == 0
    assert "seeded 1 plans" in capsys.readouterr().err
    study = optuna.load_study(study_name="digits-test", storage=url)
    assert [t.user_attrs.get(keys.TRIAL_SEEDED) for t in study.trials] == [None, None, "sensitivity"]


@pytest.mark.parametrize("trouble", [RuntimeError("stack expects each tensor to be equal size"),
                                     PassOutOfTime("the search's time ran out after 3 s")])
def test_a_pass_that_fails_or_runs_out_of_time_leaves_the_study_unseeded_and_searching(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        trouble: Exception) -> None:
    def pass_in_trouble(*args: Any) -> dict[str, Any]:
        raise trouble

    monkeypatch.setattr("slimtune.search._seeding.sensitivity_pass", pass_in_trouble)
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["search", str(_spec_file(tmp_path, 2)), "--storage", url, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert str(trouble) in err and "the study runs without seeds" in err
    study = optuna.load_study(study_name="digits-test", storage=url)
    assert [t.user_attrs.get(keys.TRIAL_SEEDED) for t in study.trials] == [None, None]
    assert stored_sensitivity(open_storage(url), "digits-test") is None  # a later run measures it again


def test_a_run_with_no_time_left_for_a_trial_measures_no_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: Any) -> dict[str, Any]:
        raise AssertionError("the pass ran with no time left")

    import tomllib

    from slimtune.search import run_study

    monkeypatch.setattr("slimtune.search._seeding.sensitivity_pass", must_not_run)
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec(tomllib.loads(_spec_file(tmp_path, 2).read_text())).with_overrides(storage=url)
    said: list[str] = []
    summary = run_study(spec, timeout=0.0, log=said.append)  # the teacher only, as a benchmark's first step
    assert summary.ran == 0 and not [line for line in said if "sensitivity pass" in line]
    assert stored_sensitivity(open_storage(url), "digits-test") is None


def test_the_pass_reads_the_data_modules_own_validation_batches() -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from slimtune.trainers._sensitivity import _validation_batches

    class Padded:  # a collate function the trials use too: the pass must not rebuild the loader
        def val_dataloader(self) -> DataLoader:
            data = TensorDataset(torch.arange(10.0).reshape(10, 1), torch.arange(10))
            return DataLoader(data, batch_size=4, collate_fn=lambda rows: {
                "x": torch.stack([r[0] for r in rows]), "y": torch.stack([r[1] for r in rows])})

    batches = _validation_batches(Padded(), samples=5)
    assert [sorted(b) for b in batches] == [["x", "y"], ["x", "y"]]  # whole batches up to 5 samples: 8
    assert torch.equal(torch.cat([b["y"] for b in batches]), torch.arange(8))


def test_seeding_is_on_by_default_and_off_in_the_presets_measured_without_it(digits_study_db: Path) -> None:
    from slimtune.search import resolve_spec

    default = parse_spec(digits_spec_dict())  # no [search.seed]: the measured default
    assert (default.search.seed.plans, default.search.seed.uniform, default.search.seed.calibrated) == (6, 4, 4)
    url = f"sqlite:///{digits_study_db}"  # a search of that spec: it measured the pass and ran seeds first
    assert stored_sensitivity(open_storage(url), "digits-test")
    trials = optuna.load_study(study_name="digits-test", storage=url).trials
    assert trials[0].user_attrs.get(keys.TRIAL_SEEDED) == "sensitivity"
    for preset, expected in [("lenet300-mnist", (6, 4)), ("lenet300-mnist-hour", (0, 0)),
                             ("lenet5-mnist-hour", (0, 0)), ("lenet5-mnist", (6, 4)), ("cnn-digits", (6, 4))]:
        seed = resolve_spec(preset=preset, name="x").search.seed
        assert (seed.plans, seed.uniform) == expected, preset


def test_a_spec_stored_before_seeding_existed_keeps_it_off_on_resume() -> None:
    from slimtune.spaces import upgrade_stored_spec

    stored = parse_spec(digits_spec_dict()).to_dict()
    del stored["search"]["seed"]  # as development code stored it before [search.seed]
    seed = parse_spec(upgrade_stored_spec(stored)).search.seed
    assert (seed.plans, seed.uniform) == (0, 0)
    assert parse_spec(upgrade_stored_spec(parse_spec(digits_spec_dict()).to_dict())).search.seed.plans == 6


def test_a_bad_seed_setting_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC_TOML.replace("[space]", "[search.seed]\nplans = -1\n\n[space]"))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["search", str(spec), "--storage", url]) == 2
    assert "search.seed.plans" in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists()


def test_the_chart_reads_the_stored_pass_as_data() -> None:
    good = {"knob": "weight_bits", "value": 4, "score": 0.8, "bytes": 100}
    data = {"base_score": 0.9, "samples": 10, "layers": {
        "fc1": {"bytes": 400, "points": [good, {"knob": "weight_bits", "value": "<script>", "score": 0.1, "bytes": 1},
                                         {"knob": 3, "value": 2, "score": 0.5, "bytes": 9}, "junk"]},
        "fc2": {"points": "not a list"}, 7: {"points": [good]}}}
    clean = clean_sensitivity(data)
    assert clean == {"base_score": 0.9, "samples": 10, "layers": {"fc1": {"bytes": 400, "points": [good]}}}
    fig, _ = sensitivity_figure(clean, metric("accuracy"))
    assert [list(trace.x) for trace in fig.data] == [[4]] and round(fig.data[0].y[0], 6) == 10.0  # points
    assert clean_sensitivity({"base_score": float("nan"), "layers": {}}) is None
    assert clean_sensitivity([1, 2]) is None


def test_the_pass_measures_from_the_fixed_values_every_trial_holds(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    fixed = tmp_path / "fixed.toml"  # every trial's weights are 8-bit: the pass's base and points are too
    fixed.write_text(_spec_file(tmp_path, 1).read_text().replace("weight_bits = { choices = [2, 4, 8, 32] }",
                                                                 "weight_bits = { fixed = 8 }"))
    assert main(["search", str(fixed), "--storage", url, "--quiet"]) == 0
    pass_ = stored_sensitivity(open_storage(url), "digits-test")
    assert pass_ is not None
    dense = tmp_path / "dense"
    dense.mkdir()
    dense_url = f"sqlite:///{dense / 's.db'}"
    assert main(["search", str(_spec_file(tmp_path, 1)), "--storage", dense_url, "--quiet"]) == 0
    unfixed = stored_sensitivity(open_storage(dense_url), "digits-test")
    assert unfixed is not None and unfixed["dense_score"] == unfixed["base_score"]
    # the same teacher (same seed): its float32 base is 2.5x the 8-bit one, and the pass scored the
    # teacher itself apart from the 8-bit base
    assert unfixed["base_bytes"] > 2.5 * pass_["base_bytes"]
    assert pass_["dense_score"] == unfixed["base_score"]
    assert {p["knob"] for entry in pass_["layers"].values() for p in entry["points"]} == {"prune_ratio", "unit_ratio"}
    for name, entry in pass_["layers"].items():  # what a layer can save: its 8-bit bytes, not its float32 ones
        full = unfixed["layers"][name]["bytes"]
        assert 0.1 * full < entry["bytes"] < 0.45 * full, name
        pruned = [p["bytes"] for p in entry["points"] if p["knob"] == "prune_ratio"]
        assert pruned and all(pass_["base_bytes"] - entry["bytes"] < b < pass_["base_bytes"] for b in pruned)


def test_a_seed_a_signal_interrupted_is_enqueued_again_once_on_resume() -> None:
    from slimtune.search._seeding import requeue_interrupted_seeds

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({"x": 0.25}, user_attrs={keys.TRIAL_SEEDED: "uniform"})
    study.enqueue_trial({"x": 0.75}, user_attrs={keys.TRIAL_SEEDED: "sensitivity"})
    for reason in ("interrupted", "ValueError: nan loss"):  # only the first is a signal's
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr(keys.TRIAL_FAIL_REASON, reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    sampled = study.ask()  # an unseeded trial interrupted too: the sampler draws again, nothing to enqueue
    sampled.suggest_float("x", 0.0, 1.0)
    sampled.set_user_attr(keys.TRIAL_FAIL_REASON, "interrupted")
    study.tell(sampled, state=optuna.trial.TrialState.FAIL)

    assert requeue_interrupted_seeds(study, room=0) == 0
    assert requeue_interrupted_seeds(study, room=5) == 1
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [(t.user_attrs, t.system_attrs["fixed_params"]) for t in waiting] == [
        ({keys.TRIAL_SEEDED: "uniform"}, {"x": 0.25})]
    assert requeue_interrupted_seeds(study, room=5) == 0  # enqueued once, not at every resume
    again = study.ask()
    assert again.suggest_float("x", 0.0, 1.0) == 0.25 and again.user_attrs == {keys.TRIAL_SEEDED: "uniform"}


def test_a_fixed_activation_width_is_in_every_point_and_saves_no_weight_bytes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = tmp_path / "act.toml"  # int8 inputs in every trial: calibrated scales, no smaller weights
    spec.write_text(_spec_file(tmp_path, 1).read_text() + "act_bits = { fixed = 8 }\n")
    assert main(["search", str(spec), "--storage", url, "--quiet"]) == 0
    pass_ = stored_sensitivity(open_storage(url), "digits-test")
    assert pass_ is not None and abs(pass_["dense_score"] - pass_["base_score"]) < 0.02
    assert {p["knob"] for entry in pass_["layers"].values() for p in entry["points"]} >= {"weight_bits", "prune_ratio"}
    from slimtune.trainers._models import DigitsCNN

    full = {name: 4 * layer.weight.numel() for name, layer in DigitsCNN().named_children() if name in pass_["layers"]}
    assert {name: entry["bytes"] for name, entry in pass_["layers"].items()} == pytest.approx(full, rel=0.05)
    assert all(entry["bytes"] <= full[name] for name, entry in pass_["layers"].items())


def test_a_calibrated_wave_follows_the_seeds_once_stronger_by_what_fine_tuning_recovered(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slimtune.studies import TrialRecord, get_blob

    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = tmp_path / "tight.toml"  # a floor of 10 points: the first seeds stop short of the pass's strongest plans
    spec.write_text(_spec_file(tmp_path, 5).read_text().replace("max_accuracy_drop = 0.5", "max_accuracy_drop = 0.1"))
    assert main(["search", str(spec), "--storage", url, "--quiet"]) == 0
    assert "calibrated seeds: the pass overstated the 3 finished seeds' fine-tuned drops" in capsys.readouterr().err
    storage = open_storage(url)
    study = optuna.load_study(study_name="digits-test", storage=url)
    kinds = [t.user_attrs.get(keys.TRIAL_SEEDED) for t in study.trials]
    assert kinds[:3] == ["sensitivity", "sensitivity", "uniform"] and kinds[3] == "calibrated" and kinds[-1] is None
    stored = json.loads(get_blob(storage, "digits-test", keys.CALIBRATION_BLOB) or b"{}")
    pass_ = clean_sensitivity(stored_sensitivity(storage, "digits-test"))
    assert pass_ is not None
    teacher = study.user_attrs[keys.TEACHER]["val_accuracy"]
    first = [TrialRecord.of(t) for t in study.trials[:3]]  # all complete here: the drop of each is its score's
    estimated = [estimated_drop(pass_, t.params) for t in study.trials[:3]]
    measured = [teacher - r.val_accuracy for r in first if r.val_accuracy is not None]
    assert len(measured) == 3 and stored["seeds"] == 3
    assert stored["factor"] == pytest.approx(min(10.0, sum(estimated) / sum(max(0.0, m) for m in measured)))
    assert stored["factor"] > 1  # fine-tuning recovered part of what the pass measured
    assert stored["strongest"] == pytest.approx(max(estimated[:2]))  # the allocated seeds' strongest
    wave = [t for t in study.trials if t.user_attrs.get(keys.TRIAL_SEEDED) == "calibrated"]
    assert len(wave) == stored["plans"] >= 1
    for trial in wave:  # stronger than every allocated seed, within the floor scaled by the factor
        assert stored["strongest"] < estimated_drop(pass_, trial.params) <= 0.1 * stored["factor"] + 1e-9

    assert main(["report", "--study", "digits-test", "--storage", url, "--out", str(tmp_path / "r.html")]) == 0
    assert (f"Its estimates were {stored['factor']:.1f}x what the first 3 seeds lost fine-tuned (counted up to "
            f"10x), so {len(wave)} calibrated plans followed, estimated up to {stored['factor']:.1f}x the floor.") in (
        tmp_path / "r.html").read_text()

    assert main(["resume", "--study", "digits-test", "--storage", url, "--trials", "7", "--quiet"]) == 0
    assert "calibrated seeds" not in capsys.readouterr().err  # once per study
    study = optuna.load_study(study_name="digits-test", storage=url)
    assert sum(t.user_attrs.get(keys.TRIAL_SEEDED) == "calibrated" for t in study.trials) == len(wave)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # trials asked by hand, not by Study.optimize
def test_the_calibrated_wave_waits_for_every_first_seed_then_scales_the_floor(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from slimtune.search._seeding import seed_calibrated
    from slimtune.studies import get_blob, put_blob

    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="w", storage=storage, directions=["maximize", "minimize"])
    spec = parse_spec({**digits_spec_dict(), "study": {"name": "w", "trials": 10, "max_accuracy_drop": 0.05}})
    context = SimpleNamespace(spec=spec, floor=0.95 - 0.05)  # a teacher at 0.95
    fc = {"bytes": 8000, "points": [{"knob": "weight_bits", "value": v, "score": s, "bytes": b}
                                    for v, s, b in ((2, 0.6, 2500), (4, 0.85, 3000), (8, 0.94, 4000))]}
    put_blob(storage, "w", keys.SENSITIVITY_BLOB, json.dumps(
        {"base_score": 0.95, "base_bytes": 10000, "dense_score": 0.95, "layers": {"fc1": fc}}).encode())
    study.enqueue_trial({"fc1.weight_bits": 8}, user_attrs={keys.TRIAL_SEEDED: "sensitivity"})  # estimated 0.01
    assert seed_calibrated(study, storage, url, context, print) == 0  # the seed waits
    trial = study.ask()
    trial.suggest_categorical("fc1.weight_bits", [2, 4, 8, 32])
    assert seed_calibrated(study, storage, url, context, print) == 0  # the seed runs
    assert get_blob(storage, "w", keys.CALIBRATION_BLOB) is None
    study.tell(trial, [0.948, 6000])  # it lost 0.002 where the pass said 0.01: 5x
    full = SimpleNamespace(spec=spec.with_overrides(trials=1), floor=context.floor)
    assert seed_calibrated(study, storage, url, full, print) == 0  # a target the seed fills: the wave waits
    assert get_blob(storage, "w", keys.CALIBRATION_BLOB) is None
    assert seed_calibrated(study, storage, url, context, print) == 1  # 4 bits (0.10 <= 5 x 0.05); 2 bits is 0.35
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [(t.system_attrs["fixed_params"], t.user_attrs) for t in waiting] == [
        ({"fc1.weight_bits": 4}, {keys.TRIAL_SEEDED: "calibrated"})]
    assert json.loads(get_blob(storage, "w", keys.CALIBRATION_BLOB) or b"{}")["factor"] == pytest.approx(5.0)
    assert seed_calibrated(study, storage, url, context, print) == 0  # once per study

    said: list[str] = []  # a stored pass of knobs this space does not search: recorded, said, the search goes on
    other = optuna.create_study(study_name="v", storage=storage, directions=["maximize", "minimize"])
    other.enqueue_trial({"fc1.weight_bits": 8}, user_attrs={keys.TRIAL_SEEDED: "sensitivity"})
    put_blob(storage, "v", keys.SENSITIVITY_BLOB, json.dumps({"base_score": 0.95, "base_bytes": 10000, "layers": {
        "fc1": {"bytes": 8000, "points": [{"knob": "bogus", "value": 2, "score": 0.6, "bytes": 2500}]}}}).encode())
    assert seed_calibrated(other, storage, url, context, said.append) == 0
    assert said and "calibrated seeds failed" in said[0] and get_blob(storage, "v", keys.CALIBRATION_BLOB)
    assert seed_calibrated(other, storage, url, context, said.append) == 0 and len(said) == 1  # once


def test_calibration_weighs_the_strong_seeds_and_is_off_in_studies_stored_before_it() -> None:
    from slimtune.spaces import calibration, upgrade_stored_spec

    assert calibration([(0.02, 0.002), (0.001, 0.001)]) == pytest.approx(7.0)  # not the mild seed's 1x
    assert calibration([(0.004, 0.008)]) == pytest.approx(0.5)  # the pass understated: a milder wave, if any
    assert calibration([(0.02, -0.003)]) == 10.0  # nothing lost: the most the wave trusts
    stored = parse_spec(digits_spec_dict()).to_dict()
    assert stored["search"]["seed"]["calibrated"] == 4  # the default
    del stored["search"]["seed"]["calibrated"]  # as a study stored before the wave existed
    assert parse_spec(upgrade_stored_spec(stored)).search.seed.calibrated == 0
