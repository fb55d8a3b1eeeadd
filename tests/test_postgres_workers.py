"""Many workers on a real PostgreSQL server: a killed worker's trial is retried, workers that
start together share one study, and bad URLs are refused with the password masked."""

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

from slimtune.search import main

from .conftest import SPEC_TOML
from .postgres import Cluster, free_port

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CLI = [sys.executable, "-m", "slimtune.search._cli"]


def _spec(tmp_path: Path, trials: int, epochs: int = 1, quick_heartbeat: bool = False) -> Path:
    """The test spec; `quick_heartbeat` lets a killed worker's trial go stale in seconds."""
    path = tmp_path / "study.toml"
    text = SPEC_TOML.replace("trials = 3", f"trials = {trials}")
    runtime = "[runtime]\nheartbeat_interval = 1\nheartbeat_grace = 3\n\n" if quick_heartbeat else ""
    path.write_text(text.replace("[finetune]\nepochs = 1", f"{runtime}[finetune]\nepochs = {epochs}"))
    return path


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "SLIMTUNE_STORAGE": url, "PYTHONUNBUFFERED": "1"}


def _wait_for_training(url: str, after: int, proc: subprocess.Popen,
                       limit: float = 120.0) -> optuna.trial.FrozenTrial:
    """The first running trial numbered `after` or later once its whole plan is stored (it is training then)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker ended before starting a trial"
        trials = optuna.load_study(study_name="digits-test", storage=url).get_trials()
        running = [t for t in trials if t.state == TrialState.RUNNING and t.number >= after
                   and set(t.params) == set(trials[0].params)]
        if running:
            return running[0]
        time.sleep(0.1)
    raise AssertionError("no trial started in time")


def test_killed_worker_trial_is_failed_and_retried_with_the_same_plan(tmp_path: Path, postgres: Cluster,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    url = postgres.create_database("kill_and_recover")
    spec = _spec(tmp_path, trials=1, epochs=40, quick_heartbeat=True)
    assert main(["search", str(spec), "--storage", url, "--quiet", "--threads", "1"]) == 0

    worker = [*CLI, "worker", "--study", "digits-test", "--trials", "3", "--quiet", "--threads", "1"]
    victim = subprocess.Popen(worker, env=_env(url), stderr=subprocess.DEVNULL)
    try:
        doomed = _wait_for_training(url, 1, victim)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        victim.wait(timeout=10)
    finally:
        victim.kill()
    survivor = subprocess.run(worker, env=_env(url), capture_output=True, text=True, timeout=300)
    assert survivor.returncode == 0, survivor.stderr

    study = optuna.load_study(study_name="digits-test", storage=url)
    trials = study.get_trials()
    assert sum(t.state in FINISHED for t in trials) == 3
    assert trials[doomed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == doomed.number]
    assert len(retries) == 1 and retries[0].state in FINISHED
    assert retries[0].params == doomed.params == trials[doomed.number].params
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    with capsys.disabled():
        print(f"\n[kill-and-recover] trial {doomed.number} killed; failed as stale and retried as trial "
              f"{retries[0].number} {retries[0].datetime_start.timestamp() - killed_at:.1f} s after the kill "
              f"(heartbeat 1 s, grace 3 s); retry finished "
              f"{retries[0].datetime_complete.timestamp() - killed_at:.1f} s after the kill")


def test_workers_started_together_on_a_new_database_create_the_study_once(tmp_path: Path, postgres: Cluster) -> None:
    url = postgres.create_database("start_together")
    spec = _spec(tmp_path, trials=6)
    command = [*CLI, "search", str(spec), "--quiet", "--threads", "1"]
    env = _env(url)
    procs = [subprocess.Popen([*command, "--storage", url], stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    outputs = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    assert sum(out.count("training the teacher") for out in outputs) == 1
    assert optuna.get_all_study_names(url) == ["digits-test"]
    trials = optuna.load_study(study_name="digits-test", storage=url).get_trials()
    assert sum(t.state in FINISHED for t in trials) == 6
    assert not [t for t in trials if t.state != TrialState.COMPLETE and t.state not in FINISHED]


def test_unreachable_server_exits_2_and_masks_the_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql+psycopg://slimtune:hunter2secret@127.0.0.1:{free_port()}/nothing"
    assert main(["search", str(_spec(tmp_path, 1)), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "storage: 'postgresql+psycopg://slimtune:***@127.0.0.1" in err and "cannot be opened" in err
    assert "hunter2secret" not in err


def test_wrong_password_exits_2_and_never_prints_it(tmp_path: Path, postgres: Cluster,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    url = postgres.bad_password_url("postgres")
    password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert main(["search", str(_spec(tmp_path, 1)), "--storage", url]) == 2
    assert main(["studies", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "password authentication failed" in err
    assert password not in err and "***" in err


def test_reading_an_empty_database_is_refused_and_writes_nothing(postgres: Cluster,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import sqlalchemy

    url = postgres.create_database("empty_for_reading")
    assert main(["studies", "--storage", url]) == 2
    assert main(["pareto", "--study", "x", "--storage", url]) == 2
    assert "holds no Optuna studies" in capsys.readouterr().err
    engine = sqlalchemy.create_engine(url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
