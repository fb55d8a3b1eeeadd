"""Study data as pandas DataFrames: every trial, the Pareto front, and the study catalog.

One column per per-layer knob (``<layer>.prune_ratio``, ``<layer>.weight_bits``,
``<layer>.kd_temperature``, ``<layer>.rank_ratio``) and per achieved value
(``<layer>.sparsity``, ``<layer>.rank``: the kept rank of a factorized layer, else its full rank).

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

from . import _keys as keys

BASE_COLUMNS = ["trial", "state", "val_accuracy", "test_accuracy", "size_bytes", "compression_ratio", "mean_bits",
                "sparsity", "kd_alpha", "feature_kd_weight", "lr", "l1_weight", "finetune_seconds", "reason", "refines"]
PARETO_COLUMNS = ["trial", "val_accuracy", "test_accuracy", "size_bytes", "compression_ratio", "mean_bits", "sparsity",
                  "refines"]


def _row(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    values = trial.values or [None, None]
    plan = attrs.get(keys.TRIAL_PLAN, {})
    row: dict[str, Any] = {
        "trial": trial.number,
        "state": trial.state.name,
        "val_accuracy": values[0],
        "test_accuracy": attrs.get(keys.TRIAL_TEST_ACCURACY),
        "size_bytes": int(values[1]) if values[1] is not None else None,
        "compression_ratio": attrs.get(keys.TRIAL_RATIO),
        "mean_bits": attrs.get(keys.TRIAL_MEAN_BITS),
        "sparsity": attrs.get(keys.TRIAL_SPARSITY),
        "kd_alpha": plan.get("kd_alpha"),
        "feature_kd_weight": plan.get("feature_kd_weight"),
        "lr": plan.get("lr"),
        "l1_weight": plan.get("l1_weight", 0.0 if plan else None),
        "finetune_seconds": attrs.get(keys.TRIAL_SECONDS, {}).get("finetune"),
        "reason": attrs.get(keys.TRIAL_FAIL_REASON) or attrs.get(keys.TRIAL_STOP_REASON),
        "refines": attrs.get(keys.TRIAL_REFINES),
    }
    for layer, knobs in plan.get("layers", {}).items():
        for knob, value in knobs.items():
            row[f"{layer}.{knob}"] = value
    for layer, stats in attrs.get(keys.TRIAL_LAYERS, {}).items():
        row[f"{layer}.sparsity"] = stats.get("sparsity")
        if "rank" in stats:
            row[f"{layer}.rank"] = stats["rank"]
    return row


def _frame(trials: list[FrozenTrial], columns: list[str]) -> pd.DataFrame:
    rows = [_row(t) for t in trials]
    extra: list[str] = []  # per-layer columns in model order (first seen), knobs in plan order
    for row in rows:
        extra.extend(k for k in row if k not in BASE_COLUMNS and k not in extra)
    layers = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in extra))
    extra.sort(key=lambda k: layers.index(k.rsplit(".", 1)[0]))
    return pd.DataFrame(rows, columns=columns + extra)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every trial of a slimtune study, one row each, ordered by trial number."""
    return _frame(study.get_trials(deepcopy=False), list(BASE_COLUMNS))


def refined_trials(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials whose plan a finished (COMPLETE or PRUNED) refinement trial
    trained again (``finetune.refine_epochs``): they are judged by that refinement instead."""
    return {t.user_attrs[keys.TRIAL_REFINES] for t in trials
            if keys.TRIAL_REFINES in t.user_attrs and t.state in (TrialState.COMPLETE, TrialState.PRUNED)}


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto-optimal trials (val accuracy up, size down), smallest first (ties: more
    accurate first, then by number). Feasible trials only when the study has constraints; a
    refined trial is left out (its refinement stands for its plan)."""
    trials = study.get_trials(deepcopy=False)
    refined = refined_trials(trials)
    return _front([t for t in trials if t.number not in refined])


def search_front(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front of the search's own trials, refinements left out and the trials they
    re-trained kept: every plan judged at the search's fidelity, smallest first (as
    :func:`pareto_trials`). The refinement stage picks its candidates here, so that one long
    refinement does not push the neighbouring short plans off the front it chooses from."""
    return _front([t for t in study.get_trials(deepcopy=False) if keys.TRIAL_REFINES not in t.user_attrs])


def _front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The complete, feasible trials of ``trials`` that no other one beats, smallest first."""
    candidates = sorted((t for t in trials if t.state == TrialState.COMPLETE
                         and all(v <= 0 for v in t.constraints.values())),
                        key=lambda t: (t.values[1], -t.values[0], t.number))
    front: list[FrozenTrial] = []
    for trial in candidates:  # by size: on the front if more accurate than every smaller trial
        best = front[-1] if front else None
        if best is None or trial.values[0] > best.values[0] or tuple(trial.values) == tuple(best.values):
            front.append(trial)
    return front


def pareto_frame(study: optuna.Study) -> pd.DataFrame:
    """The Pareto-optimal trials (val accuracy up, size down), sorted by size."""
    best = pareto_trials(study)
    frame = _frame(best, PARETO_COLUMNS + ["kd_alpha", "feature_kd_weight", "l1_weight"])
    return frame.reset_index(drop=True)


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards a study's target: COMPLETE or PRUNED."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def best_ratio_within(study: optuna.Study, max_drop: float, split: str = "val") -> float | None:
    """Largest compression ratio among complete trials whose ``split`` accuracy (``val`` or
    ``test``) is within ``max_drop`` of the teacher's; ``None`` if none is."""
    teacher = study.user_attrs.get(keys.TEACHER)
    if not teacher:
        return None
    floor = teacher[f"{split}_accuracy"] - max_drop - 1e-12
    ratios = [t.user_attrs.get(keys.TRIAL_RATIO) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if (t.values[0] if split == "val" else t.user_attrs.get(keys.TRIAL_TEST_ACCURACY, -1)) >= floor]
    ratios = [r for r in ratios if r is not None]
    return max(ratios) if ratios else None


def studies_frame(storage: optuna.storages.BaseStorage) -> pd.DataFrame:
    """One row per slimtune study in ``storage``: trials, teacher accuracy, best ratio within 1 point."""
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        teacher = study.user_attrs.get(keys.TEACHER, {})
        spec = study.user_attrs.get(keys.SPEC, {})
        rows.append({
            "study": summary.study_name,
            "finished": finished_count(study),
            "target": spec.get("study", {}).get("trials"),
            "teacher_val": teacher.get("val_accuracy"),
            "teacher_test": teacher.get("test_accuracy"),
            "best_ratio_within_1pt": best_ratio_within(study, 0.01),
        })
    return pd.DataFrame(rows, columns=["study", "finished", "target", "teacher_val", "teacher_test",
                                       "best_ratio_within_1pt"])
