"""``slimtune dashboard``: optuna-dashboard served on a real study, study notes, clean stops, bad input."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

import optuna
import pytest

from slimtune.search import main
from slimtune.studies import annotate_studies, keys, open_storage, study_note

from .conftest import SPEC_TOML

NOTE_VER = "dashboard:note_ver"  # optuna-dashboard's study system attr: the note's version
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 20  # the loop stops within 0.5 s; the rest is interpreter teardown on a busy machine
# Straight to loopback, whatever http_proxy says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file holding a 3-trial digits study (searched once for this module)."""
    folder = tmp_path_factory.mktemp("dashboard")
    spec = folder / "study.toml"
    spec.write_text(SPEC_TOML)
    db = folder / "studies.db"
    assert main(["search", str(spec), "--storage", f"sqlite:///{db}", "--quiet", "--trials", "3"]) == 0
    return db


@pytest.fixture
def db_copy(study_db: Path, tmp_path: Path) -> Path:
    """A private copy of the study database (tests here write notes into it)."""
    path = tmp_path / "copy.db"
    with closing(sqlite3.connect(study_db)) as source, closing(sqlite3.connect(path)) as target:
        source.backup(target)  # a consistent copy, WAL journal included
    return path


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(port: int, path: str) -> Any:
    with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())


def _note_version(path: Path, study: str = "digits-test") -> int | None:
    storage = open_storage(_url(path), create=False)
    return storage.get_study_system_attrs(storage.get_study_id_from_name(study)).get(NOTE_VER)


def _wait_until_serving(proc: subprocess.Popen, port: int, out: Path, log: Path) -> dict[str, Any]:
    """The study listing, once the server answers. The URL is printed after the port is bound,
    so an answer after it is this server's, not another process's that took the port first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"dashboard exited with {proc.returncode} before serving:\n{log.read_text()}")
        try:
            if f"http://127.0.0.1:{port}/dashboard" not in out.read_text():
                raise ConnectionError("not bound yet")
            return _get_json(port, "/api/studies")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard did not answer within {START_TIMEOUT_S} s:\n{log.read_text()}")
            time.sleep(0.2)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dashboard_serves_the_study_with_metric_names_and_note(db_copy: Path, tmp_path: Path) -> None:
    """Read-only by default: the note is the one the search wrote, and the file does not change."""
    before = _sha(db_copy)
    port = _free_port()
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "slimtune.search._cli", "dashboard", "--storage", _url(db_copy),
                                 "--port", str(port)], stdout=stdout, stderr=stderr, cwd=tmp_path)
    try:
        listing = _wait_until_serving(proc, port, out, err)
        (summary,) = [s for s in listing["study_summaries"] if s["study_name"] == "digits-test"]
        assert summary["directions"] == ["maximize", "minimize"]
        assert {keys.SPEC, keys.TEACHER} <= {a["key"] for a in summary["user_attrs"]}

        detail = _get_json(port, f"/api/studies/{summary['study_id']}")
        assert detail["name"] == "digits-test"
        assert detail["directions"] == ["maximize", "minimize"]
        assert detail["objective_names"] == keys.METRIC_NAMES
        assert len(detail["trials"]) == 3 and detail["best_trials"]
        assert all(len(t["values"]) == 2 for t in detail["best_trials"])
        assert {keys.TRIAL_TEST_ACCURACY, keys.TRIAL_RATIO, keys.TRIAL_PLAN} <= {a["key"] for a in
                                                                                detail["union_user_attrs"]}
        teacher = json.loads({a["key"]: a["value"] for a in detail["user_attrs"]}[keys.TEACHER])
        note = detail["note"]
        assert note["version"] == 1
        body = note["body"]
        assert body.startswith("## slimtune study `digits-test`")
        assert f"{100 * teacher['val_accuracy']:.2f}%" in body and f"{100 * teacher['test_accuracy']:.2f}%" in body
        assert f"{teacher['dense_bytes']:,}" in body and teacher["source"] in body
        assert "`val_accuracy` ↑ (maximize)" in body and "`size_bytes` ↓ (minimize)" in body
        assert "packed artifact" in body and "sampler `tpe`" in body and "`max_accuracy_drop` = 0.5" in body
        assert "`weight_bits` one of [2, 4, 8, 32]" in body and "`lr` fixed 0.002" in body

        with _OPENER.open(f"http://127.0.0.1:{port}/dashboard", timeout=10) as response:
            assert response.status == 200 and b"<html" in response.read().lower()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"http://127.0.0.1:{port}/dashboard" in out.read_text()
    assert "serving read-only" in err.read_text()
    assert _sha(db_copy) == before


def _request(port: int, method: str, path: str, body: bytes | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _serve(db: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, int, Path, Path]:
    port = _free_port()
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "slimtune.search._cli", "dashboard", "--storage", _url(db),
                                 "--port", str(port), *extra], stdout=stdout, stderr=stderr, cwd=tmp_path)
    _wait_until_serving(proc, port, out, err)
    return proc, port, out, err


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_read_only_dashboard_refuses_to_delete_or_create_a_study(db_copy: Path, tmp_path: Path) -> None:
    study_id = open_storage(_url(db_copy), read_only=True).get_study_id_from_name("digits-test")
    before = _sha(db_copy)
    proc, port, _, _ = _serve(db_copy, tmp_path)
    try:
        assert _request(port, "DELETE", f"/api/studies/{study_id}") == 403
        assert _request(port, "POST", "/api/studies", json.dumps({"study_name": "new", "directions": ["minimize"]})
                        .encode()) == 403
        assert _request(port, "GET", f"/api/studies/{study_id}") == 200
    finally:
        _stop(proc)
    assert optuna.get_all_study_names(_url(db_copy)) == ["digits-test"] and _sha(db_copy) == before


def test_allow_write_lets_the_page_change_studies_and_refreshes_notes(db_copy: Path, tmp_path: Path) -> None:
    study_id = open_storage(_url(db_copy), read_only=True).get_study_id_from_name("digits-test")
    proc, port, _, err = _serve(db_copy, tmp_path, "--allow-write")
    try:
        assert _request(port, "POST", "/api/studies", json.dumps({"study_name": "new", "directions": ["minimize"]})
                        .encode()) == 201
        assert _request(port, "DELETE", f"/api/studies/{study_id}") == 204
    finally:
        _stop(proc)
    assert "digits-test (unchanged)" in err.read_text()  # the search wrote it
    assert optuna.get_all_study_names(_url(db_copy)) == ["new"]


def test_sigterm_stops_the_server_with_exit_0(db_copy: Path, tmp_path: Path) -> None:
    port = _free_port()
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "slimtune.search._cli", "dashboard", "--storage", _url(db_copy),
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=stdout, stderr=stderr,
                                cwd=tmp_path)
    try:
        _wait_until_serving(proc, port, out, err)
        proc.terminate()
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "dashboard stopped" in err.read_text()


def test_missing_sqlite_file_exits_2_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "nope.db"
    assert main(["dashboard", "--storage", _url(db), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert "slimtune: error: storage:" in err and "has no database file" in err and str(db) in err
    assert not db.exists()


def test_port_in_use_exits_2_and_writes_no_note(db_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _sha(db_copy)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["dashboard", "--storage", _url(db_copy), "--port", str(port), "--allow-write"]) == 2
    assert f"--port: {port} is in use on 127.0.0.1; allowed: a free port" in capsys.readouterr().err
    assert _note_version(db_copy) == 1 and _sha(db_copy) == before  # the search's note, untouched


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_invalid_port_is_a_usage_error(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["dashboard", "--port", port])
    assert exit_info.value.code == 2
    assert f"argument --port: {port!r} is not allowed; allowed: an integer port in 1..65535" in capsys.readouterr().err


def test_annotate_is_idempotent_and_keeps_a_note_edited_in_the_dashboard(db_copy: Path) -> None:
    from optuna_dashboard import get_note, save_note

    storage = open_storage(_url(db_copy), create=False)
    assert _note_version(db_copy) == 1  # the search wrote it
    assert annotate_studies(storage) == {"digits-test": "unchanged"}
    assert annotate_studies(storage) == {"digits-test": "unchanged"}
    assert _note_version(db_copy) == 1
    study = optuna.load_study(study_name="digits-test", storage=storage)
    assert get_note(study) == study_note(study)

    # the teacher's record changes: the note follows, as a new version
    teacher = dict(study.user_attrs[keys.TEACHER], source="checkpoint teacher.pt")
    study.set_user_attr(keys.TEACHER, teacher)
    assert annotate_studies(storage) == {"digits-test": "written"}
    assert _note_version(db_copy) == 2 and "checkpoint teacher.pt" in get_note(study)

    # someone edits the note in the dashboard: slimtune leaves it alone from then on
    save_note(study, "my own notes")
    study.set_user_attr(keys.TEACHER, dict(teacher, source="trained"))
    assert annotate_studies(storage) == {"digits-test": "kept"}
    assert get_note(study) == "my own notes" and _note_version(db_copy) == 3


def test_annotate_skips_foreign_studies_and_names_unnamed_objectives() -> None:
    from optuna_dashboard import get_note

    from slimtune.spaces import parse_spec

    storage = optuna.storages.InMemoryStorage()
    foreign = optuna.create_study(storage=storage, study_name="foreign")
    mine = optuna.create_study(storage=storage, study_name="mine", directions=keys.DIRECTIONS)
    mine.set_user_attr(keys.SPEC, parse_spec({"study": {"name": "mine"}, "model": {"preset": "lenet300"},
                                              "data": {"preset": "mnist"}}).to_dict())
    assert annotate_studies(storage) == {"mine": "written"}
    assert get_note(foreign) == "" and foreign.metric_names is None
    assert mine.metric_names == keys.METRIC_NAMES
    assert "Not trained yet" in get_note(mine) and "preset `lenet300`" in get_note(mine)
