"""The accuracy goal: end a search once the smallest plan within a drop of the teacher stops shrinking.

``study.goal_drop`` (``search --goal-drop D``) names the drop; ``[search] goal_patience`` the
number of finished trials after which, with no smaller plan within the drop, the search stops
(as Intel Neural Compressor and Olive stop at an accuracy criterion). The rule reads only the
study (every worker's finished trials, in trial order), so all workers of a study agree on when
it is met, and a resumed study that has met it runs nothing.

Example::

    goal = Goal(drop=0.005, patience=10)
    goal.met(study)          # None, or why the search ends (the plan it ends on and how to export it)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from slimtune.studies import SLACK, TrialRecord, export_command, study_metric, teacher_accuracy

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class GoalStatus:
    """Where a study stands against its goal: the smallest trial within the drop (``None``: none
    yet), and how many finished trials came after the last one that shrank it."""

    best: int | None
    best_bytes: int | None
    since: int


@dataclass(frozen=True)
class Goal:
    """Stop when no trial within ``drop`` of the teacher's validation metric has been smaller than
    the smallest one for ``patience`` finished trials."""

    drop: float
    patience: int

    def status(self, study: optuna.Study) -> GoalStatus:
        """The smallest feasible trial within the drop, over the finished trials in trial order."""
        teacher = teacher_accuracy(study)
        best: TrialRecord | None = None
        since = 0
        for trial in sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number):
            record = TrialRecord.of(trial)
            qualifies = (teacher is not None and trial.state == TrialState.COMPLETE and record.size_bytes
                         and record.val_accuracy is not None and record.val_accuracy >= teacher - self.drop - SLACK
                         and record.feasible)
            if qualifies and (best is None or record.size_bytes < (best.size_bytes or 0)):
                best, since = record, 0
            else:
                since += 1
        return GoalStatus(best.number if best else None, best.size_bytes if best else None, since)

    def watch(self, storage_url: str | None = None) -> Callable[[optuna.Study, Any], None]:
        """A trial-loop callback raising :class:`GoalReached` once the goal is met."""
        def check(study: optuna.Study, trial: Any) -> None:
            reached = self.met(study, storage_url)
            if reached:
                raise GoalReached(reached)
        return check

    def met(self, study: optuna.Study, storage_url: str | None = None) -> str | None:
        """``None`` while the search should go on; else the sentence saying why it ends."""
        status = self.status(study)
        if status.best is None or status.since < self.patience:
            return None
        metric = study_metric(study)
        record = TrialRecord.of(next(t for t in study.get_trials(deepcopy=False) if t.number == status.best))
        ratio = f", {record.compression_ratio:.1f}x" if record.compression_ratio else ""
        command = export_command(study.study_name, storage_url, trial=status.best)  # the password masked
        return (f"goal reached: the smallest plan within {metric.drop_text(self.drop)} of the teacher's val "
                f"{metric.label}, trial "
                f"{status.best} ({status.best_bytes:,} bytes{ratio}; val {metric.format_score(record.val_accuracy)}"
                f"), has not shrunk for {status.since} finished trials (goal_patience {self.patience}). Export it "
                f"with:\n  {command}")


class GoalReached(Exception):
    """Raised by :meth:`Goal.watch` after a trial: the goal is met (the message says how)."""


def goal_of(spec: Any) -> Goal | None:
    """The spec's goal (``study.goal_drop`` with ``[search] goal_patience``), or ``None``."""
    return None if spec.goal_drop is None else Goal(spec.goal_drop, spec.search.goal_patience)
