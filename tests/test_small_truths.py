"""What the commands say is what happened: run counts, targets, empty cells, locks, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

import slimtune.search._runner as runner
from slimtune.search import main
from slimtune.spaces import parse_spec
from slimtune.studies import claim_blob, keys, open_storage

from .conftest import SPEC_TOML, copy_database, digits_spec_dict

FIXTURE = Path(__file__).parent / "fixtures" / "studies-v0.1.0.db"


def _spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(SPEC_TOML)
    return path


def test_a_smaller_trials_target_is_said_and_not_stored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["search", str(_spec_file(tmp_path)), "--storage", url, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(_spec_file(tmp_path)), "--storage", url, "--trials", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "keeps its target of 3 trials: --trials 2 does not lower it" in err
    assert "already holds 3 finished trials (--trials 2): nothing to run" in err and "(0 run now" in err
    study = optuna.load_study(study_name="digits-test", storage=url)
    assert study.user_attrs[keys.SPEC]["study"]["trials"] == 3 and len(study.trials) == 3


def test_pareto_prints_empty_cells_not_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = copy_database(FIXTURE, tmp_path / "old.db")
    assert main(["pareto", "--study", "v010-table", "--storage", f"sqlite:///{db}"]) == 0
    out = capsys.readouterr().out
    assert "refines" in out and "None" not in out and "nan" not in out.lower()


def test_workers_with_an_in_memory_database_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for url in ("sqlite://", "sqlite:///:memory:"):
        assert main(["search", str(_spec_file(tmp_path)), "--storage", url, "--workers", "2", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "--workers: 2" in err and "lives in one process's memory" in err


def test_export_onnx_without_the_extra_names_the_install_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    db = copy_database(FIXTURE, tmp_path / "old.db")
    out, onnx = tmp_path / "m.slim", tmp_path / "m.onnx"
    assert main(["export", "--study", "v010-table", "--storage", f"sqlite:///{db}", "--trial", "1", "--out", str(out),
                 "--onnx", str(onnx)]) == 2
    assert "pip install 'slimtune[onnx]'" in capsys.readouterr().err
    assert not out.exists() and not onnx.exists()


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lock(host_id: str, pid: int) -> bytes:
    return json.dumps({"token": "t", "time": 0, "host": "h", "host_id": host_id, "pid": pid}).encode()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_lock_of_a_dead_process_here_is_taken_over_at_once_and_others_after_they_go_quiet(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(runner.time, "monotonic", clock)
    watch = runner._LockWatch()
    assert watch.abandoned(_lock(runner._host_id(), _dead_pid()))  # this host, process gone: at once
    alive_here = _lock(runner._host_id(), os.getpid())
    elsewhere = _lock("another-host/boot", os.getpid())  # a pid of another host says nothing here
    for lock in (alive_here, elsewhere):
        watch = runner._LockWatch()
        assert not watch.abandoned(lock)
        clock.now += runner.TEACHER_LOCK_STALE_S - 1
        assert not watch.abandoned(lock)
        refreshed = lock.replace(b'"time": 0', b'"time": 1')
        clock.now += 2
        assert not watch.abandoned(refreshed)  # it changed: its holder lives
        clock.now += runner.TEACHER_LOCK_STALE_S + 1
        assert watch.abandoned(refreshed)  # unchanged for longer than the stale time


def test_search_takes_over_the_teacher_lock_of_a_dead_local_process_without_waiting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "TEACHER_LOCK_STALE_S", 3600.0)  # only the dead-process rule can free it
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec(digits_spec_dict(storage=url, trials=1))
    storage = open_storage(url)
    runner._open_study(spec, storage, force=False, log=lambda message: None)  # the study, no teacher yet
    assert claim_blob(storage, spec.name, keys.TEACHER_LOCK, _lock(runner._host_id(), _dead_pid()))
    capsys.readouterr()
    assert main(["search", str(_spec_file(tmp_path)), "--storage", url, "--trials", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "taking over the teacher lock" in err and "training the teacher" in err
