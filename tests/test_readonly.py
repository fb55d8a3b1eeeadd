"""Read-only commands change nothing and work on a read-only database: a read-only file system,
SQLite's URI forms (``mode=ro``, ``immutable=1``), and a plain Optuna database slimtune did not write."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from slimtune.search import main

from .conftest import copy_database
from .sandbox import CLI, run_read_only, start_read_only

STUDY = "digits-test"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _complete_trial(url: str) -> int:
    return optuna.load_study(study_name=STUDY, storage=url).get_trials(states=(TrialState.COMPLETE,))[0].number


def _get(port: int, path: str) -> int:
    with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        response.read()
        return response.status


def _serve_and_get(proc: subprocess.Popen, port: int, err: Path) -> None:
    """Wait until the dashboard answers, read a study page, then stop it with Ctrl-C (exit 0)."""
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                assert _get(port, "/api/studies") == 200
                break
            except OSError:
                assert proc.poll() is None, err.read_text()
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.3)
        assert _get(port, "/api/studies/1") == 200
        assert _get(port, "/dashboard") == 200
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0, err.read_text()


def test_read_commands_work_on_a_read_only_file_system(digits_study_db: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    db = copy_database(digits_study_db, folder / "studies.db")
    url = f"sqlite:///{db}"
    trial = _complete_trial(url)
    before = {p.name: _sha(p) for p in folder.iterdir()}
    out = tmp_path / "out"
    out.mkdir()

    for argv in (["studies", "--storage", url], ["pareto", "--study", STUDY, "--storage", url, "--format", "json"],
                 ["report", "--study", STUDY, "--storage", url, "--out", str(out / "r.html")],
                 ["export", "--study", STUDY, "--storage", url, "--trial", str(trial), "--out", str(out / "t.slim"),
                  "--onnx", str(out / "t.onnx")],
                 ["evaluate", str(out / "t.slim")],
                 ["bench", "--study", STUDY, "--storage", url, "--trial", str(trial), "--runs", "3", "--batch", "1"]):
        result = run_read_only(folder, argv, cwd=out)
        assert result.returncode == 0, (argv, result.stderr)
        assert "Traceback" not in result.stderr
    assert json.loads(run_read_only(folder, ["pareto", "--study", STUDY, "--storage", url, "--format", "json"],
                                    cwd=out).stdout)
    assert (out / "r.html").stat().st_size > 1_000_000 and (out / "t.onnx").exists()

    port = _free_port()
    err = tmp_path / "dashboard.err"
    with err.open("w") as stderr:
        proc = start_read_only(folder, ["dashboard", "--storage", url, "--port", str(port)], cwd=out,
                               stdout=subprocess.DEVNULL, stderr=stderr)
    _serve_and_get(proc, port, err)
    assert "serving read-only" in err.read_text()

    # a command that writes says what the matter is, and nothing changes
    result = run_read_only(folder, ["resume", "--study", STUDY, "--storage", url, "--trials", "4", "--quiet"], cwd=out)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"sqlite:///{db}" in result.stderr
    assert {p.name: _sha(p) for p in folder.iterdir()} == before


@pytest.mark.parametrize("query", ["mode=ro", "immutable=1"])
def test_sqlite_uri_forms_are_accepted(digits_study_db: Path, tmp_path: Path, query: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    db = copy_database(digits_study_db, tmp_path / "studies.db")
    url = f"sqlite:///file:{db}?{query}&uri=true"
    trial = _complete_trial(f"sqlite:///{db}")
    before = _sha(db)
    assert main(["studies", "--storage", url]) == 0
    assert STUDY in capsys.readouterr().out
    assert main(["pareto", "--study", STUDY, "--storage", url]) == 0
    assert main(["report", "--study", STUDY, "--storage", url, "--out", str(tmp_path / "r.html")]) == 0
    assert main(["export", "--study", STUDY, "--storage", url, "--trial", str(trial),
                 "--out", str(tmp_path / "t.slim")]) == 0
    assert _sha(db) == before
    # a read-only URL given to a command that writes is a clear error
    capsys.readouterr()
    assert main(["resume", "--study", STUDY, "--storage", url, "--trials", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "read" in err and str(db) in err


def _plain_optuna_database(path: Path) -> None:
    """A database written by Optuna alone (its own journal mode, no slimtune table)."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    both = optuna.create_study(study_name="theirs", storage=storage, directions=["maximize", "minimize"])
    for i in range(4):
        both.add_trial(optuna.trial.create_trial(params={"x": float(i)},
                                                 distributions={"x": optuna.distributions.FloatDistribution(0, 9)},
                                                 values=[i / 10, 100 - i]))
    single = optuna.create_study(study_name="single", storage=storage)
    single.optimize(lambda trial: trial.suggest_float("y", 0, 1), n_trials=2)
    storage.engine.dispose()


def _tables(path: Path) -> list[str]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))


def test_a_plain_optuna_database_is_read_without_changing_a_byte(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = tmp_path / "theirs.db"
    _plain_optuna_database(db)
    url = f"sqlite:///{db}"
    before, tables = _sha(db), _tables(db)
    assert main(["studies", "--storage", url]) == 0
    assert main(["pareto", "--study", "theirs", "--storage", url]) == 0
    assert main(["report", "--study", "theirs", "--storage", url, "--out", str(tmp_path / "r.html")]) == 0
    capsys.readouterr()
    assert main(["export", "--study", "theirs", "--storage", url, "--trial", "0", "--out", str(tmp_path / "x.slim")]) == 2
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "x.slim").exists()
    for command in (["pareto"], ["report", "--out", str(tmp_path / "s.html")], ["export", "--trial", "0", "--out",
                                                                                str(tmp_path / "s.slim")]):
        assert main([*command, "--study", "single", "--storage", url]) == 2
        err = capsys.readouterr().err
        assert "--study: 'single' is not a slimtune study (its objectives: minimize)" in err, err
        assert "allowed: a study that maximizes accuracy and minimizes bytes: theirs" in err
    assert not (tmp_path / "s.html").exists() and not (tmp_path / "s.slim").exists()
    port = _free_port()
    err = tmp_path / "dashboard.err"
    with err.open("w") as stderr:
        proc = subprocess.Popen([*CLI, "dashboard", "--storage", url, "--port", str(port)], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    _serve_and_get(proc, port, err)
    assert _sha(db) == before and _tables(db) == tables and "slimtune_blobs" not in tables
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("theirs")) == ["theirs.db"]  # no -wal, -shm
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
