"""Database faults are errors with a message, never tracebacks: a database damaged inside, a disk
that fills during a trial, a connection lost in the middle of a study. Completed trials survive
and ``resume`` recovers."""

from __future__ import annotations

import os
import random
import socket
import sqlite3
import subprocess
import threading
import time
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from slimtune.search import main

from .conftest import SPEC_TOML, copy_database
from .sandbox import CLI, run_on_full_disk

STUDY = "digits-test"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _page_size(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])


def _root_page(path: Path, table: str) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0])


def _scribble(path: Path, pages: list[int]) -> None:
    """Overwrite the given 1-based pages (all but their first 8 bytes) with seeded noise."""
    size = _page_size(path)
    rng = random.Random(0)
    with path.open("r+b") as handle:
        for page in pages:
            handle.seek((page - 1) * size + 8)
            handle.write(bytes(rng.randrange(256) for _ in range(size - 8)))


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("damage", ["many pages", "the blob table"])
def test_a_database_damaged_inside_is_a_clear_error(digits_study_db: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], damage: str) -> None:
    db = copy_database(digits_study_db, tmp_path / "studies.db")
    url = f"sqlite:///{db}"
    trial = optuna.load_study(study_name=STUDY, storage=url).get_trials(states=(TrialState.COMPLETE,))[0].number
    pages = db.stat().st_size // _page_size(db)
    _scribble(db, list(range(3, pages + 1, 2)) if damage == "many pages" else [_root_page(db, "slimtune_blobs")])
    commands = [["studies", "--storage", url], ["pareto", "--study", STUDY, "--storage", url],
                ["report", "--study", STUDY, "--storage", url, "--out", str(tmp_path / "r.html")],
                ["export", "--study", STUDY, "--storage", url, "--trial", str(trial), "--out", str(tmp_path / "t.slim")],
                ["resume", "--study", STUDY, "--storage", url, "--trials", "4", "--quiet"]]
    failed = []
    for argv in commands:
        code, err = _run(argv, capsys)
        assert "Traceback" not in err and code in (0, 2), (argv, code, err)
        if code == 2:
            failed.append(argv[0])
            assert url in err and "damaged" in err and "PRAGMA integrity_check" in err, (argv, err)
    # what reads the damaged part fails (the blobs: the sensitivity pass the report charts, the
    # teacher that export and resume load); with many pages, everything does
    assert failed == ([argv[0] for argv in commands] if damage == "many pages" else ["report", "export", "resume"])
    assert not (tmp_path / "t.slim").exists()


_BEATING = "\n[runtime]\nheartbeat_interval = 1\nheartbeat_grace = 3\n"  # heartbeats that go stale after 3 s


@pytest.fixture(scope="module")
def beating_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-trial digits study whose heartbeat goes stale after 3 s (so ``resume`` fails a trial
    left RUNNING at once), copied into one file (its WAL folded in)."""
    folder = tmp_path_factory.mktemp("beating")
    spec = folder / "s.toml"
    spec.write_text(SPEC_TOML.replace("trials = 3", "trials = 2") + _BEATING)
    db = folder / "written.db"
    assert main(["search", str(spec), "--storage", f"sqlite:///{db}", "--quiet", "--threads", "1"]) == 0
    return copy_database(db, folder / "studies.db")


@pytest.mark.parametrize("free_kib", [160, 320])
def test_a_disk_that_fills_during_a_trial(beating_study: Path, tmp_path: Path, free_kib: int) -> None:
    """The command exits 2 saying the disk is full and how to go on; every completed trial is
    intact; the trial cut short is FAIL, or, when the full disk refused that write too, the
    command says so and ``resume`` fails it by its heartbeat; ``resume`` then recovers."""
    seed = tmp_path / "seed"
    seed.mkdir()
    source = copy_database(beating_study, seed / "studies.db")
    folder = tmp_path / "disk"
    folder.mkdir()
    url = f"sqlite:///{folder / 'studies.db'}"
    before = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{source}").trials
    result, after = run_on_full_disk(folder, [source], free_kib * 1024,
                                     ["resume", "--study", STUDY, "--storage", url, "--trials", "4", "--quiet"],
                                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "disk is full" in result.stderr and url in result.stderr
    assert f"slimtune resume --study {STUDY}" in result.stderr

    saved = f"sqlite:///{after / 'studies.db'}"
    trials = optuna.load_study(study_name=STUDY, storage=saved).trials
    assert [(t.number, t.state, t.values) for t in trials[:len(before)]] == [(t.number, t.state, t.values)
                                                                            for t in before]
    cut = [t for t in trials if t.state not in FINISHED]
    assert len(cut) == 1
    if cut[0].state == TrialState.RUNNING:
        assert f"trial {cut[0].number} could not be marked FAIL either" in result.stderr
    else:
        assert cut[0].state == TrialState.FAIL

    assert main(["resume", "--study", STUDY, "--storage", saved, "--trials", "4", "--quiet"]) == 0
    trials = optuna.load_study(study_name=STUDY, storage=saved).trials
    assert sum(t.state in FINISHED for t in trials) == 4 and not any(t.state == TrialState.RUNNING for t in trials)
    assert [t.values for t in trials[:len(before)]] == [t.values for t in before]


class _Proxy:
    """A TCP forwarder to the PostgreSQL server: stopping it cuts every connection at once and
    refuses new ones, as a lost network does; it can then listen again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass
        self._sockets.clear()


def test_a_connection_lost_mid_study_is_a_clear_error_and_resume_recovers(postgres, tmp_path: Path) -> None:
    direct = postgres.create_database("lost_connection")
    proxy = _Proxy(postgres.port)
    proxy.start()
    url = direct.replace(f":{postgres.port}/", f":{proxy.port}/")
    spec = tmp_path / "slow.toml"
    spec.write_text((SPEC_TOML.replace("trials = 3", "trials = 2") + _BEATING)
                    .replace("epochs = 1", "epochs = 60"))
    env = {**os.environ, "SLIMTUNE_STORAGE": url, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*CLI, "search", str(spec), "--quiet", "--threads", "1"], stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    watcher = optuna.storages.RDBStorage(direct)  # one pool: a new one per poll runs out of server slots
    try:
        deadline = time.monotonic() + 180
        while True:  # a trial is running: cut the connection under it
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            try:
                study = optuna.load_study(study_name=STUDY, storage=watcher)
                if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
                    break
            except KeyError:
                pass
            time.sleep(0.3)
        proxy.stop()
        _, err = proc.communicate(timeout=300)
    finally:
        watcher.engine.dispose()
        proc.kill()
        proxy.stop()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and postgres.password not in err
    assert f"postgresql+psycopg://{postgres.user}:***@127.0.0.1:{proxy.port}/lost_connection" in err
    assert f"slimtune resume --study {STUDY}" in err

    proxy.start()  # the network is back
    try:
        assert main(["resume", "--study", STUDY, "--storage", url, "--quiet", "--threads", "1"]) == 0
    finally:
        proxy.stop()
    trials = optuna.load_study(study_name=STUDY, storage=direct).trials
    assert sum(t.state in FINISHED for t in trials) == 2
    assert not any(t.state == TrialState.RUNNING for t in trials)
