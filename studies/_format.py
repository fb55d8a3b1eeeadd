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

from slimtune.spaces import METRICS, Metric, SpecError, metric

FORMATS = ("table", "csv", "json")
_PERCENT = ("sparsity", *(f"{split}_{m.name}" for m in METRICS.values() if m.percent for split in ("val", "test")))
_DECIMAL = tuple(f"{split}_{m.name}" for m in METRICS.values() if not m.percent for split in ("val", "test"))
_TEACHER = ("teacher_val", "teacher_test")  # in each row's metric (a "metric" column; accuracy without one)


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
    if table_columns:  # the accuracy columns stand for the study's metric columns (val_mse, ...)
        table_columns = [_metric_column(c, frame) for c in table_columns]
    shown = frame[[c for c in table_columns if c in frame.columns]] if table_columns else frame.copy()
    logged = set(frame.attrs.get("metric_columns", {}).values())  # a logged metric's columns
    metrics = ([_metric_named(m) for m in frame["metric"]] if "metric" in frame.columns
               else [metric("accuracy")] * len(frame))
    for column in shown.columns:
        if column in _TEACHER:
            shown[column] = [m.format(None if pd.isna(v) else v) for m, v in zip(metrics, shown[column])]
        elif column in _DECIMAL or column in logged:
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
        elif column in _PERCENT:
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{100 * v:.2f}%")
        elif column in ("compression_ratio", "best_ratio_within_1pt"):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.1f}x")
        elif column == "latency_ms":
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
        elif column == "onnx_bytes":
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{int(v)}")
        elif column == "mean_bits":
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
        elif shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
        else:  # a missing value is an empty cell, never "None"
            shown[column] = shown[column].map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v))
                                              else v)
    return shown.to_string(index=False) + "\n"


def _metric_named(name: str) -> Metric:
    """A built-in metric by name, or a logged value (``[objective] monitor``), shown as a decimal."""
    return METRICS.get(name) or Metric(name, name, percent=False)


def _metric_column(name: str, frame: pd.DataFrame) -> str:
    """``val_accuracy``/``test_accuracy``, or the frame's column of the same split for its metric."""
    if name in frame.columns or name not in ("val_accuracy", "test_accuracy"):
        return name
    if name in frame.attrs.get("metric_columns", {}):  # in_metric_units named them (a logged value's)
        return frame.attrs["metric_columns"][name]
    split = name.split("_")[0]
    return next((f"{split}_{m.name}" for m in METRICS.values() if f"{split}_{m.name}" in frame.columns), name)
