"""``study.feasible_drop``: an Optuna constraint on the final validation accuracy that keeps the
Pareto front (and the sampler's attention) within a drop of the teacher."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from slimtune.search import main
from slimtune.search._objective import ACCURACY_CONSTRAINT
from slimtune.spaces import SpecError, parse_spec
from slimtune.studies import keys, pareto_trials, study_note, write_report

from .conftest import SPEC_TOML, digits_spec_dict, without_seeds


def test_feasible_drop_is_optional_validated_and_fingerprinted() -> None:
    base = parse_spec(digits_spec_dict())
    assert base.feasible_drop is None and "feasible_drop" not in base.to_dict()["study"]
    constrained = parse_spec(digits_spec_dict(feasible_drop=0.01))
    assert constrained.feasible_drop == 0.01
    assert constrained.fingerprint() != base.fingerprint()
    assert parse_spec(constrained.to_dict()).feasible_drop == 0.01  # survives the stored round trip
    for bad in (-0.1, 2, "x"):
        with pytest.raises(SpecError, match="study.feasible_drop") as err:
            parse_spec(digits_spec_dict(feasible_drop=bad))
        assert "[0.0, 1.0]" in str(err.value)


def test_trials_below_the_feasible_floor_are_kept_but_left_off_the_front(tmp_path: Path) -> None:
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(without_seeds(SPEC_TOML).replace("max_accuracy_drop = 0.5",
                                                          "max_accuracy_drop = 0.5\nfeasible_drop = 0.02"))
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["search", str(spec_file), "--storage", url, "--trials", "6", "--quiet"]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    floor = study.user_attrs[keys.TEACHER]["val_accuracy"] - 0.02
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) >= 2
    for trial in complete:
        assert trial.constraints[ACCURACY_CONSTRAINT] == pytest.approx(floor - trial.values[0])
    feasible = {t.number for t in complete if t.values[0] >= floor}
    infeasible = {t.number for t in complete} - feasible
    front = {t.number for t in pareto_trials(study)}
    assert front <= feasible and (front or not feasible)
    assert infeasible, "the digits budget leaves some trials below teacher - 0.02: the case under test"
    write_report(study, url, tmp_path / "report.html")  # the report and the dashboard note say so
    assert "feasible_drop 0.02" in (tmp_path / "report.html").read_text()
    assert "`feasible_drop` = 0.02" in (study_note(study) or "")
