"""Rendering DataFrames for the terminal (table), for spreadsheets (csv) and for programs (json).

Example:
    >>> import pandas as pd
    >>> print(render(pd.DataFrame({"trial": [3], "size_bytes": [1234]}), "csv").strip())
    trial,size_bytes
    3,1234
    >>> print(render(pd.DataFrame({"trial": [3, 4], "refines": [None, 3]}, dtype=object), "table"))
     trial refines
         3
         4       3
    <BLANKLINE>
"""

from __future__ import annotations

import pandas as pd

from slimtune.spaces import SpecError

FORMATS = ("table", "csv", "json")
_PERCENT = ("val_accuracy", "test_accuracy", "teacher_val", "teacher_test", "sparsity")


def render(frame: pd.DataFrame, fmt: str, table_columns: list[str] | None = None) -> str:
    """``frame`` as text in ``fmt`` (one of :data:`FORMATS`); the terminal ``table`` shows only
    ``table_columns`` when given (csv and json always carry every column)."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        return frame.to_json(orient="records", indent=2) + "\n"
    if fmt != "table":
        raise SpecError("--format", fmt, ", ".join(FORMATS))
    if frame.empty:
        return "(none)\n"
    shown = frame[[c for c in table_columns if c in frame.columns]] if table_columns else frame.copy()
    for column in shown.columns:
        if column in _PERCENT:
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{100 * v:.2f}%")
        elif column in ("compression_ratio", "best_ratio_within_1pt"):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.1f}x")
        elif column == "mean_bits":
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
        elif shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
        else:  # a missing value is an empty cell, never "None"
            shown[column] = shown[column].map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v))
                                              else v)
    return shown.to_string(index=False) + "\n"
