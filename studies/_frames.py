"""Study data as pandas DataFrames: every trial, the Pareto front, and the study catalog.

One column per global knob, per per-layer knob (``<layer>.prune_ratio``, ``<layer>.weight_bits``,
``<layer>.kd_temperature``, ...) and per value a method reports it achieved (``<layer>.sparsity``,
``<layer>.rank``: the kept rank of a factorized layer, else its full rank, ``<layer>.units``), all
from the registered declarations (``slimtune.spaces.declarations``).

Example:
    >>> import optuna
    >>> study = optuna.create_study(directions=["maximize", "minimize"])
    >>> list(trials_frame(study).columns[:4])
    ['trial', 'state', 'val_accuracy', 'test_accuracy']
"""

from __future__ import annotations

from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from slimtune.spaces import Metric, declarations, global_knobs, metric_of

from . import _keys as keys
from ._record import TrialRecord
from ._selection import best_ratio_within, pareto_trials

DEPLOY_COLUMNS = ["onnx_bytes", "latency_ms"]  # a study with [objective] deploy: its trials' integer ONNX
PARETO_COLUMNS = ["trial", "val_accuracy", "test_accuracy", "size_bytes", *DEPLOY_COLUMNS, "compression_ratio",
                  "mean_bits", "sparsity", "refines"]


def _global_columns() -> list[str]:
    return [k.name for k in global_knobs()]


def base_columns() -> list[str]:
    """The columns of :func:`trials_frame` before the per-layer ones."""
    return ["trial", "state", "val_accuracy", "test_accuracy", "size_bytes", "compression_ratio", "mean_bits",
            "sparsity", *_global_columns(), "finetune_seconds", "reason", "refines"]


def _layer_stats() -> list[str]:
    """The per-layer values the methods report (``weights`` and the bits, which the plan states, left out)."""
    return [stat for d in declarations() for stat in d.stats if stat != "bits"]


def _row(trial: FrozenTrial) -> dict[str, Any]:
    record = TrialRecord.of(trial)
    plan = record.plan
    row: dict[str, Any] = {
        "trial": record.number,
        "state": record.state.name,
        "val_accuracy": record.val_accuracy,
        "test_accuracy": record.test_accuracy,
        "size_bytes": record.size_bytes,
        "compression_ratio": record.compression_ratio,
        "mean_bits": record.mean_bits,
        "sparsity": record.sparsity,
        **{k.name: plan.get(k.name, k.neutral if plan and k.neutral is not None else None) for k in global_knobs()},
        "finetune_seconds": record.seconds.get("finetune"),
        "reason": record.reason,
        "refines": record.refines,
        **{k: record.deploy.get(k) for k in DEPLOY_COLUMNS if record.deploy},
    }
    for layer, knobs in plan.get("layers", {}).items():
        for knob, value in knobs.items():
            row[f"{layer}.{knob}"] = value
    for layer, stats in record.layers.items():
        for stat in _layer_stats():
            if stat in stats:
                row[f"{layer}.{stat}"] = stats[stat]
    return row


def _frame(trials: list[FrozenTrial], columns: list[str]) -> pd.DataFrame:
    rows = [_row(t) for t in trials]
    base = base_columns() + DEPLOY_COLUMNS
    extra: list[str] = []  # per-layer columns in model order (first seen), knobs in plan order
    for row in rows:
        extra.extend(k for k in row if k not in base and k not in extra)
    layers = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in extra))
    extra.sort(key=lambda k: layers.index(k.rsplit(".", 1)[0]))
    return pd.DataFrame(rows, columns=columns + extra)


def _deploy_columns(study: optuna.Study) -> list[str]:
    """:data:`DEPLOY_COLUMNS` for a study with a third objective (``[objective] deploy``), else none."""
    return DEPLOY_COLUMNS if len(study.directions) > 2 else []


def study_metric(study: optuna.Study) -> Metric:
    """The validation metric of a slimtune study (its stored spec's ``[objective]``; accuracy by default)."""
    return metric_of(study.user_attrs.get(keys.SPEC))


def in_metric_units(frame: pd.DataFrame, metric: Metric) -> pd.DataFrame:
    """``frame`` with its ``val_accuracy``/``test_accuracy`` score columns as ``val_<metric>`` and
    ``test_<metric>`` in the metric's own units (unchanged for accuracy)."""
    if metric.name == "accuracy":
        return frame
    frame = frame.copy()
    for split in ("val", "test"):
        frame[f"{split}_accuracy"] = frame[f"{split}_accuracy"].map(
            lambda v: None if v is None or pd.isna(v) else metric.value(v))
    frame = frame.rename(columns={"val_accuracy": metric.column("val"), "test_accuracy": metric.column("test")})
    if metric.logged:  # no built-in name says where its columns are, nor that they read as decimals
        frame.attrs["metric_columns"] = {"val_accuracy": metric.column("val"), "test_accuracy": metric.column("test")}
    return frame


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every trial of a slimtune study, one row each, ordered by trial number (the metric columns
    named and valued as the study's metric: ``val_accuracy``, or e.g. ``val_mse``)."""
    return in_metric_units(_frame(study.get_trials(deepcopy=False), base_columns() + _deploy_columns(study)),
                           study_metric(study))


def pareto_frame(study: optuna.Study) -> pd.DataFrame:
    """The Pareto-optimal trials (val metric at its best, size down), sorted by size."""
    best = pareto_trials(study)
    columns = [c for c in PARETO_COLUMNS if c not in DEPLOY_COLUMNS or c in _deploy_columns(study)]
    frame = _frame(best, columns + [k for k in _global_columns() if k != "lr"])
    return in_metric_units(frame.reset_index(drop=True), study_metric(study))


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards a study's target: COMPLETE or PRUNED."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def studies_frame(storage: optuna.storages.BaseStorage) -> pd.DataFrame:
    """One row per slimtune study in ``storage``: trials, its metric, the teacher's (in the metric's
    units), the best ratio within 1 point."""
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        teacher = study.user_attrs.get(keys.TEACHER, {})
        spec = study.user_attrs.get(keys.SPEC, {})
        metric = metric_of(spec)
        rows.append({
            "study": summary.study_name,
            "finished": finished_count(study),
            "target": spec.get("study", {}).get("trials"),
            "metric": metric.name,
            "teacher_val": metric.value(teacher.get("val_accuracy")),
            "teacher_test": metric.value(teacher.get("test_accuracy")),
            "best_ratio_within_1pt": best_ratio_within(study, 0.01),
        })
    return pd.DataFrame(rows, columns=["study", "finished", "target", "metric", "teacher_val", "teacher_test",
                                       "best_ratio_within_1pt"])
