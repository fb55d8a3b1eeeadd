"""``[search.refine] epochs``: the refinement stage trains the best plans again, longer, as new
trials, and the Pareto front then judges each refined plan by its refinement."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from slimtune.search import main
from slimtune.search._loop import run_until_target
from slimtune.search._refine import refine_candidates, refine_until_deadline
from slimtune.search._signals import GracefulStop
from slimtune.spaces import SpecError, parse_spec
from slimtune.studies import keys, pareto_trials, search_front

from .conftest import SPEC_TOML, digits_spec_dict, without_seeds

REFINE_TOML = SPEC_TOML.replace("epochs = 1\nbatch_size = 64", "epochs = 1\nbatch_size = 64\n\n[search.refine]\n"
                                "epochs = 2\ntop = 2\nwithin = 0.5")


def test_refine_settings_are_validated_and_neutral_by_default() -> None:
    base = parse_spec(digits_spec_dict())
    neutral = parse_spec({**digits_spec_dict(), "search": {"refine": {"epochs": 0}}})
    assert base.search.refine.epochs == 0 and neutral.fingerprint() == base.fingerprint()
    spec = parse_spec({**digits_spec_dict(), "search": {"refine": {"epochs": 3}}})
    assert spec.search.refine.epochs == 3
    assert spec.fingerprint() == base.fingerprint()  # it adds trials, changes none: a resume may add the stage
    assert parse_spec(spec.to_dict()).search.refine.epochs == 3  # survives the stored round trip
    for key, bad, allowed in (("epochs", -1, "0"), ("top", 0, "1"), ("within", 2, "[0, 1]"),
                              ("share", 1.0, "[0, 0.95]")):
        with pytest.raises(SpecError, match=f"search.refine.{key}") as err:
            parse_spec({**digits_spec_dict(), "search": {"refine": {key: bad}}})
        assert allowed in str(err.value)


def test_the_stage_refines_front_plans_as_new_trials_and_the_front_judges_them_by_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    plain, refining = tmp_path / "plain.toml", tmp_path / "refine.toml"
    plain.write_text(without_seeds(SPEC_TOML))  # the sampler's plans, some below the floor
    refining.write_text(without_seeds(REFINE_TOML))
    assert main(["search", str(plain), "--storage", url, "--trials", "10", "--quiet"]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    teacher_val = study.user_attrs[keys.TEACHER]["val_accuracy"]
    in_band = [t.number for t in pareto_trials(study) if t.values[0] >= teacher_val - 0.5]  # smallest first
    assert len(in_band) >= 2, "the digits budget gives a front of two or more: the case under test"
    # the same study resumed with a refinement stage: the target is met, so only the stage runs
    assert main(["search", str(refining), "--storage", url, "--trials", "10", "--quiet"]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    refinements = [t for t in study.trials if keys.TRIAL_REFINES in t.user_attrs]
    sources = [t.user_attrs[keys.TRIAL_REFINES] for t in refinements]
    # the smallest first; the next from the front as it stands after that refinement
    assert sources[0] == in_band[0] and set(sources) <= set(in_band) and len(sources) <= 2  # search.refine.top
    assert refine_candidates(study, teacher_val, 0.5, 2) == []  # the stage stopped because none was left
    for trial in refinements:
        source = study.trials[trial.user_attrs[keys.TRIAL_REFINES]]
        assert trial.params == source.params and trial.number >= 10  # the same plan, a new trial and seed
        assert len(source.user_attrs[keys.TRIAL_VAL_HISTORY]) == 1
        assert keys.TRIAL_PROMOTED not in trial.user_attrs  # not a promotion: counted apart
        if trial.state == TrialState.COMPLETE:
            assert len(trial.user_attrs[keys.TRIAL_VAL_HISTORY]) == 1 + 2  # epochs + search.refine.epochs
    front = {t.number for t in pareto_trials(study)}
    assert not front & set(sources)  # a refined plan stands on the front only through its refinement
    assert front, "the refinements and the other trials still make a front"

    # running again with the target met refines nothing more: refine_top plans per study
    assert main(["search", str(refining), "--storage", url, "--trials", "10", "--quiet"]) == 0
    assert len([t for t in optuna.load_study(study_name="digits-test", storage=url).trials
                if keys.TRIAL_REFINES in t.user_attrs]) == len(refinements)
    report = tmp_path / "report.html"
    assert main(["report", "--study", "digits-test", "--storage", url, "--out", str(report)]) == 0
    html = report.read_text()
    assert f"{len(refinements)} Pareto plan(s) trained again" in html
    on_front = [t.number for t in refinements if t.number in front]
    assert ("<th class=\"num\">refines</th>" in html) == bool(on_front)
    capsys.readouterr()
    assert main(["pareto", "--study", "digits-test", "--storage", url, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    refined_on_front = {t.number: t.user_attrs[keys.TRIAL_REFINES] for t in refinements if t.number in front}
    assert {r["trial"]: r["refines"] for r in rows if r["refines"] is not None} == refined_on_front

    # benchmarks/refinement_effect.py reads the pairs back (and refuses a study without any)
    script = [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "refinement_effect.py"),
              "--storage", url, "--no-results-md"]
    out = tmp_path / "effect.json"
    done = subprocess.run(script + ["--study", "digits-test", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pairs = json.loads(out.read_text())["results"]["digits-test"]["rows"]
    complete = [t for t in refinements if t.state == TrialState.COMPLETE]
    assert [(r["source"], r["refined"], r["test"]) for r in pairs] == [
        (t.user_attrs[keys.TRIAL_REFINES], t.number, t.user_attrs[keys.TRIAL_TEST_ACCURACY]) for t in complete]
    missing = subprocess.run(script + ["--study", "nope", "--out", str(tmp_path / "no.json")], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "--study nope" in missing.stderr and not (tmp_path / "no.json").exists()


def test_without_refine_epochs_no_trial_is_refined(tmp_path: Path) -> None:
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(SPEC_TOML)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["search", str(spec_file), "--storage", url, "--trials", "3", "--quiet"]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    assert len(study.trials) == 3 and not any(keys.TRIAL_REFINES in t.user_attrs for t in study.trials)


def test_a_refined_plan_leaves_the_front_even_when_its_refinement_is_worse() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for values, attrs in (([0.95, 100.0], {}), ([0.94, 120.0], {}), ([0.93, 100.0], {keys.TRIAL_REFINES: 0})):
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs=attrs))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={keys.TRIAL_REFINES: 1}))
    assert [t.number for t in study.best_trials] == [0]  # the lucky short measurement wins alone
    # trial 0 is judged by its refinement (trial 2), so trial 1 is back on the front; a failed
    # refinement (trial 3) leaves its source (trial 1) in place
    assert [t.number for t in pareto_trials(study)] == [2, 1]


def test_candidates_are_in_band_front_plans_smallest_first_up_to_refine_top() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for values in ([0.97, 300.0], [0.96, 200.0], [0.955, 150.0], [0.90, 100.0]):
        study.add_trial(optuna.trial.create_trial(values=values))
    # teacher 0.97, band 0.02: trial 3 is too far below; smallest first
    assert [t.number for t in refine_candidates(study, 0.97, 0.02, top=5)] == [2, 1, 0]
    assert [t.number for t in refine_candidates(study, 0.97, 0.02, top=2)] == [2, 1]
    study.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={keys.TRIAL_REFINES: 2}))
    assert [t.number for t in refine_candidates(study, 0.97, 0.02, top=2)] == [1]  # one claimed, one left
    study.add_trial(optuna.trial.create_trial(values=[0.95, 150.0], user_attrs={keys.TRIAL_REFINES: 1}))
    assert refine_candidates(study, 0.97, 0.02, top=2) == []  # refine_top reached


def _scripted_search(tmp_path: Path, with_deadline: bool) -> list[tuple[int | None, list[float]]]:
    """Two search trials in band, then ``refine_until_deadline`` with a scripted objective: each
    search trial takes the next pair of values from a list, a refinement its source's values with
    +0.001 accuracy. Returns ``(refines, values)`` per trial, in order."""
    tmp_path.mkdir()
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    spec = parse_spec({**digits_spec_dict(trials=6, storage=url),
                       "search": {"refine": {"epochs": 1, "top": 10, "within": 0.05}}})
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name="scripted", storage=storage, directions=["maximize", "minimize"])
    search_values = iter([(0.95, 100.0), (0.96, 200.0), (0.97, 50.0), (0.90, 10.0), (0.90, 9.0)])

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        trial.suggest_float("x", 0.0, 1.0)
        source = trial.user_attrs.get(keys.TRIAL_REFINES)
        if source is None:
            return next(search_values)
        accuracy, size = study.trials[source].values
        return accuracy + 0.001, size

    def search(target: int, until: float | None) -> int:
        return run_until_target(study, storage, objective, target, GracefulStop(), url, until)

    assert search(2, None) == 2
    deadline = time.monotonic() + 600 if with_deadline else None
    ran = refine_until_deadline(study, storage, objective, spec, GracefulStop(), teacher_val=0.97, search=search,
                                deadline=deadline)
    trials = study.get_trials()
    assert ran == len(trials) - 2
    return [(t.user_attrs.get(keys.TRIAL_REFINES), t.values) for t in trials]


def test_with_time_left_the_search_goes_on_after_the_stage_and_new_front_plans_are_refined(tmp_path: Path) -> None:
    # without a deadline the stage refines the two in-band plans (smallest first) and ends
    assert [refines for refines, _ in _scripted_search(tmp_path / "a", with_deadline=False)] == [None, None, 0, 1]
    # with time left, one more search trial (trial 4: in band and on the front), its refinement,
    # and then the study's target of 6 finished trials ends the run before the deadline
    order = _scripted_search(tmp_path / "b", with_deadline=True)
    assert [refines for refines, _ in order] == [None, None, 0, 1, None, 4]
    assert order[4][1] == [0.97, 50.0] and order[5][1] == [0.971, 50.0]


def test_a_dominant_refinement_does_not_hide_its_short_neighbours_from_the_stage() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for values, attrs in (([0.95, 100.0], {}), ([0.96, 200.0], {}), ([0.99, 90.0], {keys.TRIAL_REFINES: 0})):
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs=attrs))
    assert [t.number for t in pareto_trials(study)] == [2]  # the long run beats every short plan
    assert [t.number for t in search_front(study)] == [0, 1]  # at the search's fidelity both stand
    assert [t.number for t in refine_candidates(study, 0.97, 0.02, top=5)] == [1]  # trial 0 is taken


def test_the_stage_runs_its_own_refinement_and_not_a_seed_left_waiting(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    spec = parse_spec({**digits_spec_dict(trials=2, storage=url),
                       "search": {"refine": {"epochs": 1, "top": 1, "within": 0.05}}})
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name="leftover", storage=storage, directions=["maximize", "minimize"])

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("x", 0.0, 1.0)
        return 0.96 + 0.001 * x, 100.0

    assert run_until_target(study, storage, objective, 1, GracefulStop(), url) == 1
    # a seed still waiting (an earlier run's larger target, then `resume --trials 1`)
    study.enqueue_trial({"x": 0.5}, user_attrs={keys.TRIAL_SEEDED: "uniform"})
    ran = refine_until_deadline(study, storage, objective, spec, GracefulStop(), teacher_val=0.97,
                                search=lambda target, until: 0, deadline=None)
    trials = study.get_trials()
    assert ran == 1
    assert [(t.state, t.user_attrs.get(keys.TRIAL_REFINES), t.user_attrs.get(keys.TRIAL_SEEDED)) for t in trials] == [
        (TrialState.COMPLETE, None, None), (TrialState.WAITING, None, "uniform"), (TrialState.COMPLETE, 0, None)]
    assert trials[2].params == trials[0].params


def test_a_refinement_another_worker_took_first_leaves_this_one_a_trial_of_its_own() -> None:
    from slimtune.search._loop import ask_enqueued

    study = optuna.create_study(directions=["maximize", "minimize"])
    storage = study._storage
    claim = storage.set_trial_state_values

    def taken_first(trial_id: int, state: TrialState, values: Any = None) -> bool:
        claim(trial_id, state, values)  # another worker, on a database slot_lock cannot lock, got there first
        return False

    storage.set_trial_state_values = taken_first  # type: ignore[method-assign]
    trial = ask_enqueued(study, storage, {"x": 0.5}, {keys.TRIAL_REFINES: 0})
    storage.set_trial_state_values = claim  # type: ignore[method-assign]
    states = [t.state for t in study.get_trials()]
    assert trial.number == 1 and states == [TrialState.RUNNING, TrialState.RUNNING]  # the other's, and its own
