"""Study databases: storage URLs, blobs, trial records, selection, frames, reports, dashboard, presets.

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
from ._dashboard import (
    FRONT_PLOT_ID, PLANS_PLOT_ID, annotate_studies, annotate_study, publish_figures, read_only_app, serve_dashboard,
    study_note,
)
from ._figures import export_command, front_figure, plans_figure
from ._format import FORMATS, render
from ._frames import (
    PARETO_COLUMNS, base_columns, finished_count, in_metric_units, pareto_frame, studies_frame, study_metric,
    trials_frame,
)
from ._presets import load_preset, preset_names
from ._record import COMPLETED, TrialRecord, TrialWriter, records, refinement_attrs, refines_of
from ._report import write_report
from ._sensitivity import clean_sensitivity, sensitivity_figure, stored_calibration, stored_sensitivity
from ._selection import (
    SLACK,
    best_at_test_accuracy,
    best_ratio_within,
    front,
    pareto_trials,
    refine_candidates,
    refined_trials,
    search_front,
    teacher_accuracy,
    within_drop,
)
from ._storage import (
    STORAGE_ERRORS,
    StorageError,
    folder_lock,
    is_in_memory,
    load_existing_study,
    mask_url,
    open_storage,
    sqlite_lock,
    sqlite_path,
    storage_fault,
)

__all__ = [
    "COMPLETED", "DEFAULT_DASHBOARD_HOST", "DEFAULT_DASHBOARD_PORT", "FORMATS", "FRONT_PLOT_ID", "PARETO_COLUMNS",
    "PLANS_PLOT_ID", "SLACK", "STORAGE_ERRORS", "StorageError", "TrialRecord", "TrialWriter", "annotate_studies",
    "annotate_study", "base_columns", "best_at_test_accuracy", "best_ratio_within", "claim_blob", "clean_sensitivity",
    "create_blob_table", "delete_blobs", "drop_blob", "engine_of", "export_command", "finished_count", "folder_lock",
    "front", "front_figure", "get_blob", "in_metric_units", "is_in_memory", "keys", "load_existing_study",
    "load_preset", "mask_url", "open_storage", "pareto_frame", "pareto_trials", "plans_figure", "preset_names",
    "publish_figures", "put_blob", "read_only_app", "records", "refine_candidates", "refined_trials",
    "refinement_attrs", "refines_of", "render", "search_front", "sensitivity_figure", "serve_dashboard", "sqlite_lock",
    "sqlite_path", "storage_fault", "stored_calibration", "stored_sensitivity", "studies_frame", "study_metric",
    "study_note", "teacher_accuracy", "touch_blob", "trials_frame", "within_drop", "write_report",
]
