"""Binary artifacts kept in the study database itself, through SQLAlchemy.

The teacher's weights and each trial's packed artifact live in table ``slimtune_blobs`` of the
same database as the study, so anything that can reach the storage URL (another worker, the
export command) reads the very same bytes.

Example:
    >>> import optuna
    >>> storage = optuna.storages.RDBStorage("sqlite://")
    >>> put_blob(storage, "study", "teacher", b"weights")
    >>> get_blob(storage, "study", "teacher")
    b'weights'
"""

from __future__ import annotations

import weakref

import optuna
from sqlalchemy import Column, LargeBinary, MetaData, String, Table, delete, insert, inspect, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

_metadata = MetaData()
_ready: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines whose blob table exists
BLOBS = Table(
    "slimtune_blobs", _metadata,
    Column("study_name", String(512), primary_key=True),
    Column("key", String(256), primary_key=True),
    Column("data", LargeBinary, nullable=False),
)


def engine_of(storage: optuna.storages.BaseStorage) -> Engine:
    """The SQLAlchemy engine of an RDB storage (also through Optuna's cache wrapper)."""
    inner = getattr(storage, "_backend", storage)  # unwrap optuna's cached storage
    engine = getattr(inner, "engine", None)
    if engine is None:
        raise TypeError(f"blob storage needs an RDB storage, got {type(storage).__name__}")
    return engine


def create_blob_table(storage: optuna.storages.BaseStorage) -> Engine:
    """The storage's engine, with the blob table created if it is not there (writers call this)."""
    engine = engine_of(storage)
    if engine not in _ready:
        _metadata.create_all(engine, checkfirst=True)
        _ready.add(engine)
    return engine


def _has_blob_table(engine: Engine) -> bool:
    if engine not in _ready and inspect(engine).has_table(BLOBS.name):
        _ready.add(engine)
    return engine in _ready


def put_blob(storage: optuna.storages.BaseStorage, study_name: str, key: str, data: bytes) -> None:
    """Store ``data`` under ``(study_name, key)``, replacing what was there, in one transaction."""
    with create_blob_table(storage).begin() as conn:
        conn.execute(delete(BLOBS).where(BLOBS.c.study_name == study_name, BLOBS.c.key == key))
        conn.execute(insert(BLOBS).values(study_name=study_name, key=key, data=data))


def get_blob(storage: optuna.storages.BaseStorage, study_name: str, key: str) -> bytes | None:
    """The bytes under ``(study_name, key)``, or ``None``."""
    engine = engine_of(storage)
    if not _has_blob_table(engine):  # a database slimtune never wrote to (read-only commands create nothing)
        return None
    with engine.connect() as conn:
        row = conn.execute(select(BLOBS.c.data).where(BLOBS.c.study_name == study_name, BLOBS.c.key == key)).first()
    return bytes(row[0]) if row is not None else None


def delete_blobs(storage: optuna.storages.BaseStorage, study_name: str) -> None:
    """Remove every blob of a study (used when a study is deleted)."""
    with create_blob_table(storage).begin() as conn:
        conn.execute(delete(BLOBS).where(BLOBS.c.study_name == study_name))


def claim_blob(storage: optuna.storages.BaseStorage, study_name: str, key: str, data: bytes) -> bool:
    """Insert ``data`` under ``(study_name, key)`` only if nothing is there: ``True`` for the one
    caller that succeeds (a lock that works across processes and machines)."""
    try:
        with create_blob_table(storage).begin() as conn:
            conn.execute(insert(BLOBS).values(study_name=study_name, key=key, data=data))
        return True
    except IntegrityError:
        return False


def drop_blob(storage: optuna.storages.BaseStorage, study_name: str, key: str) -> None:
    """Remove one blob (no error if it is not there)."""
    with create_blob_table(storage).begin() as conn:
        conn.execute(delete(BLOBS).where(BLOBS.c.study_name == study_name, BLOBS.c.key == key))


def touch_blob(storage: optuna.storages.BaseStorage, study_name: str, key: str, data: bytes) -> None:
    """Replace the bytes of an existing blob in place (no moment without it, unlike put_blob)."""
    with create_blob_table(storage).begin() as conn:
        conn.execute(update(BLOBS).where(BLOBS.c.study_name == study_name, BLOBS.c.key == key).values(data=data))
