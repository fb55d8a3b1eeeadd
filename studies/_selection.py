"""Choosing trials of a study, in one place: the Pareto front, the search's own front, the smallest
trial within a drop of the teacher, the best at a test accuracy, and the plans to refine.

Every choice is made on validation accuracy and size (test accuracy only where a caller asks for
a test-accuracy figure, which is then reporting, not selection), among the complete and feasible
trials; a trial whose plan a refinement trained again is judged by that refinement. "Accuracy"
here is the study's score of its ``[objective] metric``: the metric itself, or minus it for a
metric that is minimized (``slimtune.spaces.Metric``), so higher is always better.

Example:
    >>> import optuna
    >>> study = optuna.create_study(directions=["maximize", "minimize"])
    >>> for val, size in ((0.9, 100.0), (0.95, 300.0), (0.94, 400.0)):
    ...     _ = study.tell(study.ask(), [val, size])
    >>> [t.number for t in pareto_trials(study)]
    [0, 1]
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimtune.spaces import SpecError, metric_of

from . import _keys as keys
from ._record import TrialRecord

SLACK = 1e-12  # float noise allowed in "accuracy >= teacher - drop"


def refined_trials(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials whose plan a finished (COMPLETE or PRUNED) refinement trial trained
    again (``[search.refine]``): they are judged by that refinement instead."""
    found = set()
    for trial in trials:
        record = TrialRecord.of(trial)
        if record.refines is not None and trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            found.add(record.refines)
    return found


def _dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
    """``a`` is at least as accurate and no larger (nor slower: a third objective) than ``b``, and not equal."""
    return (a.values[0] >= b.values[0] and all(x <= y for x, y in zip(a.values[1:], b.values[1:]))
            and tuple(a.values) != tuple(b.values))


def front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The complete, feasible trials of ``trials`` that no other one beats, smallest first (ties:
    more accurate first, then by number); with a third objective (``[objective] deploy``), on
    all three."""
    candidates = sorted((t for t in trials if t.state == TrialState.COMPLETE and TrialRecord.of(t).feasible),
                        key=lambda t: (t.values[1], -t.values[0], t.number))
    if any(len(t.values) > 2 for t in candidates):
        return [t for t in candidates if not any(_dominates(other, t) for other in candidates)]
    chosen: list[FrozenTrial] = []
    for trial in candidates:  # by size: on the front if more accurate than every smaller trial
        best = chosen[-1] if chosen else None
        if best is None or trial.values[0] > best.values[0] or tuple(trial.values) == tuple(best.values):
            chosen.append(trial)
    return chosen


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto-optimal trials (val accuracy up, size down), smallest first. Feasible trials
    only when the study has constraints; a refined trial is left out (its refinement stands for
    its plan)."""
    trials = study.get_trials(deepcopy=False)
    refined = refined_trials(trials)
    return front([t for t in trials if t.number not in refined])


def search_front(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front of the search's own trials, refinements left out and the trials they
    re-trained kept: every plan judged at the search's fidelity, smallest first. The refinement
    stage picks its candidates here, so that one long refinement does not push the neighbouring
    short plans off the front it chooses from."""
    return front([t for t in study.get_trials(deepcopy=False) if TrialRecord.of(t).refines is None])


def teacher_accuracy(study: optuna.Study, split: str = "val") -> float | None:
    """The teacher's accuracy on ``split`` (``val`` or ``test``), ``None`` before it is recorded."""
    teacher = study.user_attrs.get(keys.TEACHER) or {}
    value = teacher.get(f"{split}_accuracy")
    return float(value) if isinstance(value, (int, float)) else None


def within_drop(study: optuna.Study, max_drop: float) -> FrozenTrial:
    """The smallest Pareto-optimal trial whose val accuracy is at least the teacher's minus
    ``max_drop`` (what ``slimtune export --max-drop`` picks); a :class:`SpecError` saying the
    smallest drop that would select one when none does."""
    teacher_val = teacher_accuracy(study)
    if teacher_val is None:
        raise SpecError("--study", study.study_name, "a slimtune study with a teacher", "has no teacher record")
    within = [t for t in pareto_trials(study) if t.values[0] >= teacher_val - max_drop - SLACK]
    if within:
        return within[0]  # the smallest
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise SpecError("--max-drop", max_drop, "a study with a complete trial",
                        f"selects nothing: study {study.study_name} has no complete trial yet")
    best = max(complete, key=lambda t: t.values[0])
    needed = math.ceil((teacher_val - best.values[0] - 1e-13) * 1e4) / 1e4  # rounded up, so it selects
    metric = metric_of(study.user_attrs.get(keys.SPEC))
    raise SpecError("--max-drop", max_drop, f"a drop of at least {needed:.4f}: the best trial, {best.number}, has val "
                    f"{metric.format_score(best.values[0])} against the teacher's "
                    f"{metric.format_score(teacher_val)}", "selects no trial")


def best_ratio_within(study: optuna.Study, max_drop: float, split: str = "val") -> float | None:
    """Largest compression ratio among complete trials whose ``split`` accuracy (``val`` or
    ``test``) is within ``max_drop`` of the teacher's; ``None`` if none is."""
    teacher = teacher_accuracy(study, split)
    if teacher is None:
        return None
    floor = teacher - max_drop - SLACK
    ratios = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        record = TrialRecord.of(trial)
        accuracy = record.val_accuracy if split == "val" else record.test_accuracy
        if accuracy is not None and accuracy >= floor and record.compression_ratio is not None:
            ratios.append(record.compression_ratio)
    return max(ratios) if ratios else None


def best_at_test_accuracy(study: optuna.Study, min_test: float) -> tuple[float, int, int] | None:
    """``(ratio, bytes, trial)`` of the most compressed Pareto trial (chosen on validation) whose
    test accuracy is at least ``min_test``; ``None`` if there is none (a reporting figure: the
    benchmarks' columns at the teacher's test error)."""
    fits = [TrialRecord.of(t) for t in pareto_trials(study)]
    fits = [r for r in fits if r.test_accuracy is not None and r.test_accuracy >= min_test - SLACK
            and r.compression_ratio is not None]
    if not fits:
        return None
    best = max(fits, key=lambda r: r.compression_ratio or 0.0)
    return float(best.compression_ratio or 0.0), int(best.size_bytes or 0), best.number


def refine_candidates(study: optuna.Study, teacher_val: float, within: float, top: int) -> list[FrozenTrial]:
    """The plans still to refine, in order: the search's own Pareto trials (:func:`search_front`)
    with validation accuracy at least ``teacher_val - within`` and no refinement yet (waiting,
    running or finished), smallest first; none once ``top`` plans have been refined."""
    claimed = {r.refines for r in (TrialRecord.of(t) for t in study.get_trials(deepcopy=False))
               if r.refines is not None and r.state != TrialState.FAIL}
    room = top - len(claimed)
    if room <= 0:
        return []
    chosen = [t for t in search_front(study) if t.number not in claimed and t.values[0] >= teacher_val - within - SLACK]
    return chosen[:room]
