"""Storage URLs: opening Optuna's RDB storage on SQLite or PostgreSQL, and masking passwords.

Example:
    >>> mask_url("postgresql+psycopg://ann:s3cret@db.example/slim")
    'postgresql+psycopg://ann:***@db.example/slim'
"""

from __future__ import annotations

from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from slimtune.spaces import SpecError

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


def open_storage(url: str, create: bool = True) -> optuna.storages.RDBStorage:
    """Open (and, with ``create``, initialise) the study database at ``url``.

    With ``create=False`` a missing SQLite file is an error instead of a new empty database, so
    read-only commands never leave files behind.
    """
    try:
        parsed = make_url(url)
    except Exception:
        raise StorageError(url, "is not a valid SQLAlchemy URL") from None
    engine_kwargs: dict = {}
    path = sqlite_path(url)
    if parsed.get_backend_name() == "sqlite":
        if path is not None and not path.exists():
            if not create:
                raise StorageError(url, "has no database file", f"an existing database; {path} does not exist")
            if not path.parent.exists():
                raise StorageError(url, "points into a folder that does not exist", f"a path in an existing folder")
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=False)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, RuntimeError) as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        password = parsed.password
        if password:
            detail = detail.replace(str(password), "***")
        raise StorageError(url, f"cannot be opened ({type(exc).__name__}: {detail[:300]})") from None


def load_existing_study(name: str, url: str) -> optuna.Study:
    """An existing study at ``url``; a missing database or study is an error listing what exists."""
    storage = open_storage(url, create=False)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise SpecError("--study", name, ", ".join(sorted(names)) or f"(no studies in {mask_url(url)})",
                        f"does not exist in {mask_url(url)}")
    return optuna.load_study(study_name=name, storage=storage)
