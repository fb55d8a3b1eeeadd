"""Storage URLs: opening Optuna's RDB storage on SQLite or PostgreSQL, and masking passwords.

Example:
    >>> mask_url("postgresql+psycopg://ann:s3cret@db.example/slim")
    'postgresql+psycopg://ann:***@db.example/slim'
"""

from __future__ import annotations

import fcntl
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from slimtune.spaces import SpecError

from ._blobs import engine_of

SQLITE_BUSY_TIMEOUT_S = 60


class StorageError(SpecError):
    """A storage URL that cannot be used (bad, unreachable, refused). The password is masked."""

    def __init__(self, url: str, problem: str, allowed: str = "a reachable SQLAlchemy URL such as "
                 "sqlite:///slimtune.db or postgresql+psycopg://user:password@host:5432/db") -> None:
        super().__init__("storage", mask_url(url), allowed, problem)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for every message, log and report)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable storage URL>"


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (``None`` for other backends or in-memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


DEFAULT_HEARTBEAT_INTERVAL_S = 20
DEFAULT_HEARTBEAT_GRACE_S = 60
MAX_STALE_RETRIES = 3


def _engine_kwargs(url: str, create: bool) -> dict[str, Any]:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return {"pool_pre_ping": True}
    path = sqlite_path(url)
    if path is not None and not path.exists():
        if not create:
            raise StorageError(url, "has no database file", f"an existing database; {path} does not exist")
        if not path.parent.exists():
            raise StorageError(url, "points into a folder that does not exist", "a path in an existing folder")
    return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}


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
                 heartbeat_grace: int | None = DEFAULT_HEARTBEAT_GRACE_S) -> optuna.storages.RDBStorage:
    """Open (and, with ``create``, initialise) the study database at ``url``.

    With ``create=False`` a missing SQLite file is an error instead of a new empty database, so
    read-only commands never leave files behind. Heartbeats are on (a running trial whose worker
    stops sending them for ``heartbeat_grace`` seconds is failed by the next worker and retried
    with the same parameters, up to 3 times); pass ``heartbeat_interval=None`` to turn them off.
    SQLite files get WAL journaling and a 60 s busy timeout so several local workers can share one.
    Concurrent first openings are safe: schema creation is serialized (SQLite) or retried.
    """
    try:
        make_url(url)
    except Exception:
        raise StorageError(url, "is not a valid SQLAlchemy URL") from None
    engine_kwargs = _engine_kwargs(url, create)
    if not create and sqlite_path(url) is None:
        _require_optuna_schema(url, engine_kwargs)
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_STALE_RETRIES)
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": heartbeat_grace,
                     "heartbeat_stale_trial_callback": retry}
    last_error: Exception | None = None
    for attempt in range(5):
        try:
            with sqlite_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
                engine_of(storage)  # slimtune's blob table, created here under the same lock
                if sqlite_path(url) is not None:
                    with storage.engine.connect() as conn:
                        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            return storage
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Another process created the schema at the same moment: the next attempt finds it.
            last_error = exc
            time.sleep(0.2 * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, RuntimeError) as exc:
            last_error = exc
            break
    raise StorageError(url, f"cannot be opened ({_describe(last_error, url)})") from None


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
    text = str(getattr(exc, "orig", None) or exc).strip()
    detail = text.splitlines()[0] if text else type(exc).__name__
    password = make_url(url).password
    if password:
        detail = detail.replace(str(password), "***")
    return f"{type(exc).__name__}: {detail[:300]}"


def load_existing_study(name: str, url: str) -> optuna.Study:
    """An existing study at ``url``; a missing database or study is an error listing what exists."""
    storage = open_storage(url, create=False)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise SpecError("--study", name, ", ".join(sorted(names)) or f"(no studies in {mask_url(url)})",
                        f"does not exist in {mask_url(url)}")
    return optuna.load_study(study_name=name, storage=storage)
