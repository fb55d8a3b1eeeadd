"""Study databases: storage URLs, blobs, the study catalog, Pareto fronts, presets, rendering.

No torch here: listing studies and reading Pareto fronts work with only the database.

Example:
    >>> from slimtune.studies import mask_url, preset_names
    >>> mask_url("postgresql://u:pw@h/db"), "cnn-digits" in preset_names()
    ('postgresql://u:***@h/db', True)
"""

from __future__ import annotations

from . import _keys as keys
from ._blobs import claim_blob, create_blob_table, delete_blobs, drop_blob, engine_of, get_blob, put_blob, touch_blob
from ._dashboard import DEFAULT_HOST as DEFAULT_DASHBOARD_HOST
from ._dashboard import DEFAULT_PORT as DEFAULT_DASHBOARD_PORT
from ._dashboard import annotate_studies, annotate_study, read_only_app, serve_dashboard, study_note
from ._format import FORMATS, render
from ._frames import PARETO_COLUMNS, best_ratio_within, finished_count, pareto_frame, pareto_trials, search_front, studies_frame, trials_frame
from ._presets import load_preset, preset_names
from ._report import write_report
from ._storage import (
    STORAGE_ERRORS, StorageError, folder_lock, is_in_memory, load_existing_study, mask_url, open_storage, sqlite_lock,
    sqlite_path, storage_fault,
)

__all__ = [
    "STORAGE_ERRORS", "storage_fault", "claim_blob", "create_blob_table", "drop_blob", "engine_of", "folder_lock", "is_in_memory", "touch_blob",
    "FORMATS", "PARETO_COLUMNS", "StorageError", "best_ratio_within", "delete_blobs", "finished_count", "get_blob", "keys",
    "load_existing_study", "load_preset", "mask_url", "open_storage", "pareto_frame", "pareto_trials", "preset_names", "search_front", "put_blob", "render",
    "sqlite_lock", "sqlite_path", "studies_frame", "trials_frame",
    "DEFAULT_DASHBOARD_HOST", "DEFAULT_DASHBOARD_PORT", "annotate_studies", "annotate_study", "read_only_app",
    "serve_dashboard", "study_note",
    "write_report",
]
