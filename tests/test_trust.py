"""The trust rule: code named by data (a .slim file, a study row) is never imported unless trusted.

Every hostile reference here names ``subprocess:getoutput`` with a shell command that would
create a marker file; each command that reads the data must refuse it (exit 2, a message that
says why and how to trust it) and the marker must not appear.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from slimtune.search import main
from slimtune.spaces import TRUST_ENV
from slimtune.studies import get_blob, keys, open_storage, put_blob
from slimtune.trainers import DigitsCNN, pack_model, unpack_model

from .conftest import copy_database

STUDY = "digits-test"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _hostile(marker: Path) -> dict[str, Any]:
    """A reference that runs a shell command when called (and creates ``marker``)."""
    return {"factory": "subprocess:getoutput", "kwargs": {"cmd": f"touch {marker}"}}


def _hostile_data(marker: Path) -> dict[str, Any]:
    return {"module": "subprocess:getoutput", "kwargs": {"cmd": f"touch {marker}"}}


@pytest.fixture(autouse=True)
def _no_trust() -> Any:
    """Nothing trusted before a test, and what ``--trust`` added gone after it."""
    before = os.environ.pop(TRUST_ENV, None)
    yield
    os.environ.pop(TRUST_ENV, None)
    if before is not None:
        os.environ[TRUST_ENV] = before


@pytest.fixture
def db(digits_study_db: Path, tmp_path: Path) -> Path:
    return copy_database(digits_study_db, tmp_path / "studies.db")


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _complete(path: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=_url(path)).get_trials(states=(TrialState.COMPLETE,))


def _refused(code: int, err: str, marker: Path, module: str = "subprocess") -> None:
    assert code == 2, err
    assert "slimtune does not import code named by data" in err, err
    assert f"--trust {module}" in err and f"{TRUST_ENV}={module}" in err
    assert "Traceback" not in err
    assert not marker.exists()


def _crafted_artifact(meta: dict[str, Any]) -> bytes:
    return pack_model(DigitsCNN(), meta=meta)


@pytest.mark.parametrize("part", ["model", "data"])
def test_evaluate_refuses_a_crafted_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str], part: str) -> None:
    marker = tmp_path / "MARKER"
    meta = {"model": {"preset": "cnn-digits"}, "data": {"preset": "digits"}}
    meta[part] = _hostile(marker) if part == "model" else _hostile_data(marker)
    path = tmp_path / "crafted.slim"
    path.write_bytes(_crafted_artifact(meta))
    capsys.readouterr()
    code = main(["evaluate", str(path)])
    err = capsys.readouterr().err
    _refused(code, err, marker)
    assert f"is named by artifact {path}" in err


def test_a_trusted_module_named_by_an_artifact_is_imported_and_said(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The way out of the refusal works, and the command says what it imports."""
    path = tmp_path / "own.slim"
    path.write_bytes(_crafted_artifact({"model": {"factory": "slimtune.trainers:DigitsCNN"},
                                        "data": {"preset": "digits"}}))
    assert main(["evaluate", str(path)]) == 2
    assert "--trust slimtune.trainers" in capsys.readouterr().err
    assert main(["evaluate", str(path), "--json", "--trust", "slimtune.trainers"]) == 0
    captured = capsys.readouterr()
    assert '"accuracy"' in captured.out
    assert (f"importing model.factory slimtune.trainers:DigitsCNN (named by artifact {path}, trusted by "
            f"{TRUST_ENV})") in captured.err


def _tamper_artifact(db: Path, number: int, blob: bytes) -> None:
    """Replace a trial's stored artifact, and its recorded size with it, as someone who can write
    to the database could."""
    put_blob(open_storage(_url(db)), STUDY, keys.artifact_blob_key(number), blob)
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("UPDATE trial_values SET value = ? WHERE objective = 1 AND trial_id = "
                     "(SELECT trial_id FROM trials WHERE number = ?)", (float(len(blob)), number))
        conn.commit()


def test_export_and_evaluate_refuse_a_tampered_trial_artifact(db: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "MARKER"
    trial = _complete(db)[0]
    _, meta = unpack_model(get_blob(open_storage(_url(db), read_only=True), STUDY,
                                    keys.artifact_blob_key(trial.number)) or b"")
    _tamper_artifact(db, trial.number, _crafted_artifact({**meta, "model": _hostile(marker)}))
    out, onnx = tmp_path / "out.slim", tmp_path / "out.onnx"
    capsys.readouterr()

    code = main(["export", "--study", STUDY, "--storage", _url(db), "--trial", str(trial.number), "--out", str(out),
                 "--onnx", str(onnx)])
    err = capsys.readouterr().err
    _refused(code, err, marker)
    assert f"is named by the stored artifact of trial {trial.number} of study {STUDY}" in err
    assert not out.exists() and not onnx.exists()

    # without --onnx, export copies the stored bytes and imports nothing; evaluate then refuses them
    assert main(["export", "--study", STUDY, "--storage", _url(db), "--trial", str(trial.number),
                 "--out", str(out)]) == 0
    assert not marker.exists() and out.stat().st_size == len(get_blob(open_storage(_url(db)), STUDY,
                                                                         keys.artifact_blob_key(trial.number)) or b"")
    capsys.readouterr()
    _refused(main(["evaluate", str(out)]), capsys.readouterr().err, marker)


def _tamper_spec(db: Path, part: str, marker: Path) -> None:
    study = optuna.load_study(study_name=STUDY, storage=_url(db))
    spec = study.user_attrs[keys.SPEC]
    spec[part] = _hostile(marker) if part == "model" else _hostile_data(marker)
    study.set_user_attr(keys.SPEC, spec)


@pytest.mark.parametrize("part", ["model", "data"])
@pytest.mark.parametrize("command", ["resume", "worker"])
def test_resume_and_worker_refuse_a_tampered_stored_spec(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         part: str, command: str) -> None:
    marker = tmp_path / "MARKER"
    _tamper_spec(db, part, marker)
    before = len(optuna.load_study(study_name=STUDY, storage=_url(db)).trials)
    capsys.readouterr()
    code = main([command, "--study", STUDY, "--storage", _url(db), "--trials", "5", "--quiet"])
    err = capsys.readouterr().err
    _refused(code, err, marker)
    assert f"is named by the spec stored in study '{STUDY}'" in err
    assert len(optuna.load_study(study_name=STUDY, storage=_url(db)).trials) == before


def test_read_commands_show_a_tampered_spec_without_running_it(db: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "MARKER"
    _tamper_spec(db, "model", marker)
    report = tmp_path / "report.html"
    assert main(["report", "--study", STUDY, "--storage", _url(db), "--out", str(report)]) == 0
    assert "subprocess:getoutput" in report.read_text()  # shown as text, as the spec says it
    assert main(["pareto", "--study", STUDY, "--storage", _url(db)]) == 0
    assert main(["studies", "--storage", _url(db)]) == 0
    assert main(["export", "--study", STUDY, "--storage", _url(db), "--trial", str(_complete(db)[0].number),
                 "--out", str(tmp_path / "x.slim"), "--onnx", str(tmp_path / "x.onnx")]) == 0  # its own artifact
    assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()


def test_the_dashboard_serves_a_tampered_study_without_running_it(db: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    _tamper_spec(db, "model", marker)
    _tamper_artifact(db, _complete(db)[0].number, _crafted_artifact({"model": _hostile(marker),
                                                                     "data": _hostile_data(marker)}))
    with socket_port() as port:
        err = tmp_path / "err.txt"
        with err.open("w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "slimtune.search._cli", "dashboard", "--storage", _url(db),
                                     "--port", str(port)], stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with _OPENER.open(f"http://127.0.0.1:{port}/api/studies/1", timeout=10) as response:
                        assert response.status == 200
                        break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
                    time.sleep(0.3)
            with _OPENER.open(f"http://127.0.0.1:{port}/dashboard/studies/1", timeout=10) as response:
                assert response.status == 200
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    assert "Traceback" not in err.read_text() and not marker.exists()


class socket_port:
    """A free loopback port, as a context manager (released before the server binds it)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        pass


def test_workers_trust_the_modules_of_the_users_own_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--workers`` reads the spec back from the database, where it is data: the workers are
    told to trust exactly the modules the user's own spec file named."""
    from .conftest import SPEC_TOML

    spec = tmp_path / "own.toml"
    spec.write_text(SPEC_TOML.replace('preset = "cnn-digits"', 'factory = "slimtune.trainers:DigitsCNN"'))
    url = _url(tmp_path / "w.db")
    assert main(["search", str(spec), "--storage", url, "--trials", "2", "--workers", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "(2 run now" in err
    study = optuna.load_study(study_name=STUDY, storage=url)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 2
    assert TRUST_ENV not in os.environ  # this process trusted nothing more than it was given

    # the stored spec is data for the next command too: resume needs the trust said
    assert main(["resume", "--study", STUDY, "--storage", url, "--trials", "3", "--quiet"]) == 2
    assert "--trust slimtune.trainers" in capsys.readouterr().err
    assert main(["resume", "--study", STUDY, "--storage", url, "--trials", "3", "--quiet",
                 "--trust", "slimtune.trainers"]) == 0
