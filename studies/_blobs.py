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

import optuna
from sqlalchemy import Column, LargeBinary, MetaData, String, Table, delete, insert, select

_metadata = MetaData()
BLOBS = Table(
    "slimtune_blobs", _metadata,
    Column("study_name", String(512), primary_key=True),
    Column("key", String(256), primary_key=True),
    Column("data", LargeBinary, nullable=False),
)


def _engine(storage: optuna.storages.BaseStorage):  # type: ignore[no-untyped-def]
    inner = getattr(storage, "_backend", storage)  # unwrap optuna's cached storage
    engine = getattr(inner, "engine", None)
    if engine is None:
        raise TypeError(f"blob storage needs an RDB storage, got {type(storage).__name__}")
    _metadata.create_all(engine, checkfirst=True)
    return engine


def put_blob(storage: optuna.storages.BaseStorage, study_name: str, key: str, data: bytes) -> None:
    """Store ``data`` under ``(study_name, key)``, replacing what was there, in one transaction."""
    with _engine(storage).begin() as conn:
        conn.execute(delete(BLOBS).where(BLOBS.c.study_name == study_name, BLOBS.c.key == key))
        conn.execute(insert(BLOBS).values(study_name=study_name, key=key, data=data))


def get_blob(storage: optuna.storages.BaseStorage, study_name: str, key: str) -> bytes | None:
    """The bytes under ``(study_name, key)``, or ``None``."""
    with _engine(storage).connect() as conn:
        row = conn.execute(select(BLOBS.c.data).where(BLOBS.c.study_name == study_name, BLOBS.c.key == key)).first()
    return bytes(row[0]) if row is not None else None


def delete_blobs(storage: optuna.storages.BaseStorage, study_name: str) -> None:
    """Remove every blob of a study (used when a study is deleted)."""
    with _engine(storage).begin() as conn:
        conn.execute(delete(BLOBS).where(BLOBS.c.study_name == study_name))
