"""Storage URLs: opening Optuna's RDB storage on SQLite or PostgreSQL, and masking passwords.

Example:
    >>> mask_url("postgresql+psycopg://ann:s3cret@db.example/slim")
    'postgresql+psycopg://ann:***@db.example/slim'
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote, unquote

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from slimtune.spaces import SpecError

from ._blobs import create_blob_table

SQLITE_BUSY_TIMEOUT_S = 60


class StorageError(SpecError):
    """A storage URL that cannot be used (bad, unreachable, refused). The password is masked."""

    def __init__(self, url: str, problem: str, allowed: str = "a reachable SQLAlchemy URL such as "
                 "sqlite:///slimtune.db or postgresql+psycopg://user:password@host:5432/db") -> None:
        super().__init__("storage", mask_url(url), allowed, problem)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for every message, log and report)."""
    try:
        parsed = make_url(url)
    except Exception:
        return "<unparseable storage URL>"
    return url if parsed.password is None else parsed.render_as_string(hide_password=True)


_TRUE = ("true", "1", "yes", "on")


def _uses_uri(url: str) -> bool:
    """Whether a SQLite URL is in SQLite's URI form (``sqlite:///file:x.db?mode=ro&uri=true``)."""
    return str(make_url(url).query.get("uri", "")).lower() in _TRUE


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, also in SQLite's URI form
    (``sqlite:///file:x.db?mode=ro&uri=true``); ``None`` for other backends or in-memory.

    >>> sqlite_path("sqlite:///file:runs/x.db?mode=ro&uri=true"), sqlite_path("sqlite://")
    (PosixPath('runs/x.db'), None)
    """
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if _uses_uri(url) and database.startswith("file:"):
        path = unquote(database[len("file:"):].partition("?")[0])
        if path.startswith("//"):  # file://host/path: SQLite allows only an empty host or localhost
            path = "/" + path[2:].partition("/")[2]
        mode = str(parsed.query.get("mode", ""))
        if not path or path == ":memory:" or mode == "memory":
            return None
        return Path(path)
    return Path(database)


def is_in_memory(url: str) -> bool:
    """Whether ``url`` is a SQLite database that lives in one process's memory.

    >>> is_in_memory("sqlite://"), is_in_memory("sqlite:///:memory:"), is_in_memory("sqlite:///x.db")
    (True, True, False)
    """
    return make_url(url).get_backend_name() == "sqlite" and sqlite_path(url) is None


DEFAULT_HEARTBEAT_INTERVAL_S = 20
DEFAULT_HEARTBEAT_GRACE_S = 60
MAX_STALE_RETRIES = 3


def _engine_kwargs(url: str, create: bool, read_only: bool) -> dict[str, Any]:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if read_only and parsed.get_backend_name() == "postgresql":  # the server refuses any write
            kwargs["connect_args"] = {"options": "-c default_transaction_read_only=on"}
        return kwargs
    path = sqlite_path(url)
    if path is not None and not path.exists():
        if not create or read_only:
            raise StorageError(url, "has no database file", f"an existing database; {path} does not exist")
        if not path.parent.exists():
            raise StorageError(url, "points into a folder that does not exist", "a path in an existing folder")
    if read_only and path is not None and not _uses_uri(url):
        uri = _read_only_uri(url, path)
        return {"creator": lambda: sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S,
                                                   check_same_thread=False)}
    return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}


def _refuse_read_only(url: str) -> None:
    """A :class:`StorageError` for a SQLite database that cannot be written here, before opening it."""
    path = sqlite_path(url)
    if path is None:
        return
    query = make_url(url).query
    given = str(query.get("mode", "")) == "ro" or str(query.get("immutable", "")) in _TRUE
    folder = path.parent if str(path.parent) else Path(".")
    if given or (path.exists() and not os.access(path, os.W_OK)) or (folder.exists() and not os.access(folder, os.W_OK)):
        why = "its URL opens it read-only" if given else "its file or folder is read-only here"
        raise StorageError(url, f"cannot be written ({why})", "a writable database for search, resume and worker "
                           "(studies, pareto, report, export and dashboard read this one as it is)")


def _read_only_uri(url: str, path: Path) -> str:
    """SQLite's URI for reading ``path`` without writing a byte of it (``mode=ro``); on a folder
    this process cannot write (a read-only file system), ``immutable=1`` as well, which SQLite
    needs to read a WAL database there unless its ``-shm`` file exists."""
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    shm, wal = Path(f"{path}-shm"), Path(f"{path}-wal")
    if os.access(path.parent, os.W_OK) or shm.exists():
        return uri
    if wal.exists() and wal.stat().st_size > 0:
        raise StorageError(url, f"has changes in {wal.name} that cannot be read from a read-only folder without "
                           f"{shm.name}", "a copy of the database in a writable folder (or the folder writable)")
    return uri + "&immutable=1"


@contextmanager
def folder_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between local processes on the folder holding ``path`` (no lock file
    is left behind)."""
    folder = os.open(path.resolve().parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)


@contextmanager
def sqlite_lock(url: str) -> Iterator[None]:
    """For a SQLite URL, :func:`folder_lock` on its file; for any other database, nothing.
    It serializes schema creation between local processes opening one new SQLite file at once
    (Optuna's set-up otherwise fails with ``table alembic_version already exists``)."""
    path = sqlite_path(url)
    if path is None:
        yield
    else:
        with folder_lock(path):
            yield


def open_storage(url: str, create: bool = True, heartbeat_interval: int | None = DEFAULT_HEARTBEAT_INTERVAL_S,
                 heartbeat_grace: int | None = DEFAULT_HEARTBEAT_GRACE_S,
                 read_only: bool = False) -> optuna.storages.RDBStorage:
    """Open (and, with ``create``, initialise) the study database at ``url``.

    With ``create=False`` a missing SQLite file is an error instead of a new empty database.
    Heartbeats are on (a running trial whose worker
    stops sending them for ``heartbeat_grace`` seconds is failed by the next worker and retried
    with the same parameters, up to 3 times); pass ``heartbeat_interval=None`` to turn them off.
    SQLite files get WAL journaling and a 60 s busy timeout so several local workers can share one.
    Concurrent first openings are safe: schema creation is serialized (SQLite) or retried.

    ``read_only=True`` (the commands that only read: ``studies``, ``pareto``, ``report``,
    ``export``, ``dashboard``) changes no byte of the database: no table is created, the journal
    mode stays as it is, SQLite opens it with ``mode=ro`` (and ``immutable=1`` on a read-only
    file system) and PostgreSQL sessions are read-only. A URL in SQLite's own URI form
    (``sqlite:///file:x.db?mode=ro&uri=true``) is used as given.
    """
    try:
        make_url(url)
    except Exception:
        raise StorageError(url, "is not a valid SQLAlchemy URL") from None
    engine_kwargs = _engine_kwargs(url, create, read_only)
    if not read_only:
        _refuse_read_only(url)
    if (read_only or not create) and sqlite_path(url) is None:
        _require_optuna_schema(url, engine_kwargs)
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval and not read_only:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_STALE_RETRIES)
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": heartbeat_grace,
                     "heartbeat_stale_trial_callback": retry}
    last_error: Exception | None = None
    for attempt in range(5):
        try:
            if read_only:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=True)
                with storage.engine.connect() as conn:  # fail here, not in the first query, if it cannot be read
                    conn.exec_driver_sql("SELECT 1 FROM studies LIMIT 1")
                return storage
            with sqlite_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
                create_blob_table(storage)  # slimtune's blob table, created here under the same lock
                if sqlite_path(url) is not None:
                    with storage.engine.connect() as conn:
                        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            return storage
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Another process created the schema at the same moment: the next attempt finds it.
            last_error = exc
            if read_only:
                break
            time.sleep(0.2 * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError, ValueError,
                RuntimeError, sqlite3.Error, OSError) as exc:
            last_error = exc
            break
    path = sqlite_path(url)
    if read_only and path is not None and path.exists() and not os.access(path.parent, os.W_OK):
        raise StorageError(url, f"cannot be opened ({_describe(last_error, url)})",
                           "on a read-only file system, SQLite reads a WAL database only with immutable=1: "
                           f"sqlite:///file:{path}?immutable=1&uri=true (or leave the URL plain: slimtune adds it)")
    detail = _describe(last_error, url)
    raise StorageError(url, f"cannot be opened ({detail})", _advice(detail, url)) from None


def _require_optuna_schema(url: str, engine_kwargs: dict[str, Any]) -> None:
    """For read-only use of a server database: refuse one without Optuna's tables (a wrong
    database name), instead of letting Optuna create them there."""
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs)
        try:
            has_studies = sqlalchemy.inspect(engine).has_table("studies")
        finally:
            engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise StorageError(url, f"cannot be opened ({_describe(exc, url)})") from None
    if not has_studies:
        raise StorageError(url, "holds no Optuna studies", "a database that slimtune or Optuna has written to")


def _describe(exc: Exception | None, url: str) -> str:
    """One line about a connection error, with the URL's password masked."""
    if exc is None:
        return "unknown error"
    while isinstance(exc, optuna.exceptions.StorageInternalError) and isinstance(exc.__cause__, Exception):
        exc = exc.__cause__  # Optuna's wrapper says only "an exception is raised during the commit"
    text = str(getattr(exc, "orig", None) or exc).strip()
    detail = text.splitlines()[0] if text else type(exc).__name__
    password = make_url(url).password
    if password:
        detail = detail.replace(str(password), "***")
    return f"{type(exc).__name__}: {detail[:300]}"


STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, sqlite3.Error)
"""What a study database raises when it is corrupt, full, read-only or unreachable."""


def storage_fault(exc: BaseException, url: str, study: str | None = None) -> str:
    """A message for a database error met while working on ``url``: what failed (password
    masked), and what to do, for people rather than for a traceback.

    >>> print(storage_fault(sqlite3.DatabaseError("database disk image is malformed"), "sqlite:///runs.db", "s"))
    ... # doctest: +ELLIPSIS
    the study database sqlite:///runs.db failed (DatabaseError: database disk image is malformed): it is damaged...
    """
    detail = _describe(exc if isinstance(exc, Exception) else None, url)
    return f"the study database {mask_url(url)} failed ({detail}): {_advice(detail, url, study)}"


def _advice(detail: str, url: str, study: str | None = None) -> str:
    """What to do about a database error whose one-line description is ``detail``."""
    text = detail.lower()
    path = sqlite_path(url) if make_url(url).get_backend_name() == "sqlite" else None
    resume = (f"; then `slimtune resume --study {study}` goes on (a trial this cut short is failed by its "
              "heartbeat and run again; every completed trial is kept)") if study else ""
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        check = f"`sqlite3 {path} 'PRAGMA integrity_check'`" if path else "the server's logs"
        return f"it is damaged: check it with {check} and restore a good copy" + resume
    if "disk is full" in text or "no space" in text or "disk quota" in text or "file too large" in text:
        return "the disk is full: free some space" + resume
    if "readonly" in text or "read-only" in text or "read only" in text:
        return ("it can only be read here (a read-only file or file system, or a read-only URL): use a "
                "writable copy for commands that write (search, resume, worker)")
    if "locked" in text or "busy" in text:
        return "another process holds it locked: wait for it, or stop it" + resume
    return "check that it is reachable and accepts this connection" + resume


# slimtune's objectives, in order: validation accuracy up, artifact bytes down.
READ_DIRECTIONS = (optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE)


def load_existing_study(name: str, url: str) -> optuna.Study:
    """An existing study at ``url``, opened read-only (see :func:`open_storage`); a missing
    database or study is an error listing what exists."""
    storage = open_storage(url, read_only=True)
    studies = {study.study_name: study for study in storage.get_all_studies()}
    ours = sorted(n for n, study in studies.items() if tuple(study.directions[:2]) == READ_DIRECTIONS)
    allowed = ", ".join(ours) or f"(no (accuracy, bytes) studies in {mask_url(url)})"
    if name not in studies:
        raise SpecError("--study", name, allowed, f"does not exist in {mask_url(url)}")
    if name not in ours:
        directions = ", ".join(d.name.lower() for d in studies[name].directions)
        raise SpecError("--study", name, f"a study that maximizes accuracy and minimizes bytes: {allowed}",
                        f"is not a slimtune study (its objectives: {directions})")
    return optuna.load_study(study_name=name, storage=storage)
