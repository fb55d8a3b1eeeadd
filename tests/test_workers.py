"""Several workers on one SQLite study: exact target, nothing lost, no lock errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from slimtune.search import main

from .conftest import SPEC_TOML

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _spec(tmp_path: Path, trials: int) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(SPEC_TOML.replace("trials = 3", f"trials = {trials}"))
    return path


def _check_study(url: str, target: int) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="digits-test", storage=url)
    trials = study.get_trials()
    assert sum(t.state in FINISHED for t in trials) == target
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    reasons = [t.user_attrs.get("fail_reason", "") for t in trials if t.state == TrialState.FAIL]
    assert not reasons, reasons
    plans = [repr(sorted(t.params.items())) for t in trials]
    assert len(set(plans)) == len(plans), "two workers sampled the same plan"
    return trials


def test_four_local_workers_reach_exactly_the_target(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    assert main(["search", str(_spec(tmp_path, 12)), "--storage", url, "--workers", "4", "--threads", "4",
                 "--quiet"]) == 0
    trials = _check_study(url, 12)
    assert len(trials) == 12


def test_searches_started_together_on_a_new_database_create_it_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    spec = _spec(tmp_path, 8)
    command = [sys.executable, "-m", "slimtune.search._cli", "search", str(spec), "--storage", url, "--quiet",
               "--threads", "1"]
    procs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ}) for _ in range(4)]
    outputs = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], outputs
    assert sum(out.count("training the teacher") for out in outputs) == 1
    assert optuna.get_all_study_names(url) == ["digits-test"]
    _check_study(url, 8)
