"""Interruptions and failing trials: nothing left RUNNING, reasons recorded, the study goes on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import slimtune.search._objective as objective_module
from slimtune.search import GracefulStop, Interrupted, main
from slimtune.studies import keys

from .conftest import SPEC_TOML


def _wait_for_running_trial(url: str, proc: subprocess.Popen, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            study = optuna.load_study(study_name="digits-test", storage=url)
            if any(t.state == TrialState.RUNNING and t.params for t in study.trials):  # planned, training
                return
        except (KeyError, Exception):
            pass
        time.sleep(0.2)
    raise AssertionError("no trial started in time")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_marks_the_running_trial_failed_and_resume_goes_on(tmp_path: Path, sig: signal.Signals) -> None:
    spec = tmp_path / "slow.toml"
    spec.write_text(SPEC_TOML.replace("trials = 3", "trials = 1").replace("epochs = 1", "epochs = 40"))
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slimtune.search._cli", "search", str(spec), "--storage", url,
                             "--quiet", "--threads", "1"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_running_trial(url, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "slimtune resume --study digits-test" in err
    assert "0/1 finished trials (1 run now" in err  # the trial it cut short counts as run
    study = optuna.load_study(study_name="digits-test", storage=url)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL]
    assert study.trials[0].user_attrs[keys.TRIAL_FAIL_REASON] == "interrupted"
    assert study.trials[0].user_attrs[keys.TRIAL_SEEDED] == "sensitivity"  # seeding is on by default

    assert main(["resume", "--study", "digits-test", "--storage", url, "--quiet", "--threads", "1"]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    assert [t.state for t in study.trials][0] == TrialState.FAIL
    assert study.trials[1].state in (TrialState.COMPLETE, TrialState.PRUNED)
    # the seed it cut short runs again: the stored pass is not measured again, its plan not lost
    assert study.trials[1].user_attrs[keys.TRIAL_SEEDED] == "sensitivity"
    assert study.trials[1].system_attrs["fixed_params"] == study.trials[0].system_attrs["fixed_params"]


def test_a_signal_whose_raise_library_code_swallowed_still_ends_the_trial_body() -> None:
    with GracefulStop() as stop, pytest.raises(Interrupted, match="SIGTERM"):
        with stop.trial_body():
            try:  # as code that catches Exception would, the raise from the handler is lost here
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1.0)
            except Exception:
                pass
    assert stop.signal_name == "SIGTERM"


def test_a_failing_trial_records_its_reason_and_the_study_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_run_trial = objective_module.run_trial

    def flaky(context, plan, seed, **options):  # type: ignore[no-untyped-def]
        if seed == 1:  # trial 1 (the spec's seed is 0)
            raise FloatingPointError("non-finite loss (nan) at epoch 0, step 3")
        return real_run_trial(context, plan, seed, **options)

    monkeypatch.setattr(objective_module, "run_trial", flaky)
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC_TOML)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    assert main(["search", str(spec), "--storage", url, "--quiet"]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    assert study.trials[1].state == TrialState.FAIL
    assert study.trials[1].user_attrs[keys.TRIAL_FAIL_REASON] == "FloatingPointError: non-finite loss (nan) at epoch 0, step 3"
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and len(study.trials) == 4


def test_nan_loss_is_detected_in_the_fine_tune(digits_teacher) -> None:
    import copy

    import torch

    from slimtune.trainers import DistillationModule, TeacherCache, quiet_trainer
    from slimtune.trainers import materialize

    teacher, dm = digits_teacher
    x, y = materialize(dm.train_dataloader().dataset)
    cache = TeacherCache.build(teacher, x, y, [], budget_mb=16)
    cache.logits[:] = float("nan")
    module = DistillationModule(copy.deepcopy(teacher).requires_grad_(True), lr=1e-3, kd_alpha=0.9,
                               logit_temperature=2.0, feature_kd_weight=0.0, feature_temperatures={}, cache=cache)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        quiet_trainer(1, 0).fit(module, train_dataloaders=cache.loader(64, 0))
    assert torch.isfinite(teacher(x[:2])).all()


def test_accuracy_floor_prunes_with_a_reason(tmp_path: Path) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC_TOML.replace("max_accuracy_drop = 0.5", "max_accuracy_drop = 0.0")
                    .replace("prune_ratio = { low = 0.2, high = 0.8 }", "prune_ratio = { fixed = 0.97 }")
                    .replace("weight_bits = { choices = [2, 4, 8, 32] }", "weight_bits = { fixed = 2 }"))
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    assert main(["search", str(spec), "--storage", url, "--quiet", "--trials", "2"]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    assert [t.state for t in study.trials] == [TrialState.PRUNED, TrialState.PRUNED]
    assert "below the floor" in study.trials[0].user_attrs[keys.TRIAL_STOP_REASON]
    assert len(study.trials[0].user_attrs[keys.TRIAL_VAL_HISTORY]) == 1
