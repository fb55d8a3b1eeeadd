"""The accuracy goal: a search ends once the smallest plan within a drop stops shrinking, says
which plan and how to export it, and a resumed study that met it runs nothing."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from slimtune.search import main
from slimtune.search._goal import Goal
from slimtune.spaces import SpecError, parse_spec
from slimtune.studies import keys

from .conftest import SPEC_TOML, digits_spec_dict, without_seeds


def _study_with(sizes_and_vals: list[tuple[float, float] | None]) -> optuna.Study:
    """A study whose teacher has val 0.9 and whose trials have these (val, bytes); None: pruned."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr(keys.TEACHER, {"val_accuracy": 0.9, "test_accuracy": 0.9})
    for item in sizes_and_vals:
        trial = study.ask()
        if item is None:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, [item[0], item[1]])
    return study


def test_the_goal_counts_finished_trials_since_the_smallest_plan_within_the_drop_last_shrank() -> None:
    goal = Goal(drop=0.01, patience=3)
    study = _study_with([(0.895, 500), (0.85, 100), (0.893, 400), None, (0.899, 450)])
    status = goal.status(study)
    assert (status.best, status.best_bytes, status.since) == (2, 400, 2)  # 0.85 is out; 450 is not smaller
    assert goal.met(study) is None
    study.tell(study.ask(), state=TrialState.PRUNED)
    reached = goal.met(study, "sqlite:///s.db")
    assert reached is not None and "trial 2 (400 bytes" in reached and "has not shrunk for 3 finished trials" in reached
    assert "slimtune export --study" in reached and "--trial 2" in reached
    assert Goal(drop=0.01, patience=3).met(_study_with([(0.5, 10)] * 5)) is None  # nothing within the drop yet


def test_the_goal_is_a_spec_key_left_out_of_the_fingerprint() -> None:
    base = parse_spec(digits_spec_dict())
    with_goal = parse_spec(digits_spec_dict(goal_drop=0.005))
    assert with_goal.goal_drop == 0.005 and base.goal_drop is None
    assert with_goal.fingerprint() == base.fingerprint()  # it says when to stop, not what a trial means
    with pytest.raises(SpecError, match="study.goal_drop"):
        parse_spec(digits_spec_dict(goal_drop=-1))


def test_a_search_with_a_goal_ends_early_says_what_to_export_and_resume_runs_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(without_seeds(SPEC_TOML).replace("trials = 3", "trials = 40").replace(
        "[space]", "[search]\ngoal_patience = 2\n\n[space]"))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["search", str(spec), "--storage", url, "--quiet", "--threads", "1", "--goal-drop", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "goal reached: the smallest plan within 50 points of the teacher's val accuracy" in err, err
    assert "slimtune export --study digits-test" in err
    study = optuna.load_study(study_name="digits-test", storage=url)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 3 <= len(finished) < 40  # the goal ended it, not the target
    assert main(["resume", "--study", "digits-test", "--storage", url, "--quiet", "--threads", "1",
                 "--goal-drop", "0.5"]) == 0
    assert "goal reached" in capsys.readouterr().err
    assert len(optuna.load_study(study_name="digits-test", storage=url).trials) == len(study.trials)
    with pytest.raises(SystemExit) as refused:
        main(["search", str(spec), "--storage", url, "--goal-drop", "-1"])
    assert refused.value.code == 2 and "argument --goal-drop: '-1' is not allowed" in capsys.readouterr().err
