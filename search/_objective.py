"""The Optuna objective: sample a plan, run the trial, record everything, return the objectives.

Returns ``(val_accuracy, size_bytes)``. Per-trial user attrs hold the plan, the achieved
per-layer sparsity and bits, test accuracy, compression ratio, timings and the stop reason. A
trial below the accuracy floor after an epoch is PRUNED (reason recorded); a trial that raises
is FAIL with ``fail_reason`` recorded, and the study goes on. The packed artifact of a
completed trial is stored in the study database (``trial/<n>/artifact``). With
``search.promote.epochs``, whether the trial earned its extra epochs is the ``promoted`` attr
(rule: :func:`beaten_by_completed`). With ``study.feasible_drop`` set, each completed trial
carries the Optuna constraint ``accuracy_drop`` = ``feasible_floor - val_accuracy`` (feasible
when <= 0), so the samplers and the Pareto front (:func:`~slimtune.studies.pareto_trials`) keep
to trials within that drop of the teacher. A trial carrying the ``refines`` attr (enqueued by the
refinement stage, ``_refine``) trains ``search.refine.epochs`` extra epochs, unconditionally.

Example::

    objective = CompressionObjective(context, storage, stop)
    study.optimize(objective, n_trials=5, catch=(TrialFailed,))
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable

import optuna
import torch

from slimtune.spaces import sample_plan
from slimtune.studies import STORAGE_ERRORS, TrialWriter, keys, put_blob, records, refines_of
from slimtune.trainers import TrialContext, run_trial

from ._signals import GracefulStop, Interrupted


ACCURACY_CONSTRAINT = "accuracy_drop"  # feasible_floor - val_accuracy; feasible when <= 0


class TrialFailed(Exception):
    """A trial failed for a recorded reason; the search continues with the next trial."""


def describe_failure(exc: BaseException) -> str:
    """``"Type: first line of the message"``, the form of every recorded ``fail_reason``."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:500] if text else ''}"


def beaten_by_completed(study: optuna.Study, margin: float, base_epochs: int,
                        size_tolerance: float = 1.0) -> Callable[[float, int], bool]:
    """The promotion rule: a trial at ``(val_accuracy, size_bytes)`` after ``base_epochs``
    earns its extra epochs unless a completed trial of ``study`` at most ``size_tolerance``
    times as large (1: at most as large) was
    more than ``margin`` more accurate **after the same number of epochs** (its
    ``val_history``; its final accuracy where that is shorter). Comparing at equal fidelity keeps
    promoted trials from shutting out every newcomer. Read when the question is asked, so it
    sees trials finished by other workers.

    Returns ``promote(val_accuracy, size_bytes) -> bool``.
    """
    def promote(val_accuracy: float, size_bytes: int) -> bool:
        for done in records(study, states=(optuna.trial.TrialState.COMPLETE,)):
            accuracy = done.val_after(base_epochs)
            known = accuracy if accuracy is not None else -math.inf  # scores: minus an error can be below 0
            if (done.size_bytes or 0) <= size_tolerance * size_bytes and known > val_accuracy + margin:
                return False
        return True
    return promote


class CompressionObjective:
    """Callable objective bound to one study's shared trial context."""

    def __init__(self, context: TrialContext, storage: optuna.storages.BaseStorage, stop: GracefulStop,
                 feasible_floor: float | None = None, run: str = "") -> None:
        self.context = context
        self.storage = storage
        self.stop = stop
        self.feasible_floor = feasible_floor
        self.worker = {"host": socket.gethostname(), "pid": os.getpid(), "run": run}

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        started = time.perf_counter()
        writer = TrialWriter(trial)
        writer.started(self.worker)
        spec = self.context.spec
        plan = sample_plan(trial, spec.space, self.context.layer_names, self.context.output_layer,
                           self.context.inert)
        writer.planned(plan.to_dict())
        sample_seconds = time.perf_counter() - started
        refinement = refines_of(trial) is not None
        try:
            with self.stop.trial_body():
                if refinement:  # the refinement stage: train the plan longer
                    result = run_trial(self.context, plan, seed=spec.seed + trial.number,
                                       promote=lambda accuracy, size: True, extra_epochs=spec.search.refine.epochs,
                                       log_version=f"trial-{trial.number}")
                else:
                    result = run_trial(self.context, plan, seed=spec.seed + trial.number,
                                       promote=beaten_by_completed(trial.study, spec.search.promote.margin,
                                                                   spec.finetune.epochs,
                                                                   spec.search.promote.size_tolerance),
                                       log_version=f"trial-{trial.number}")
        except (Interrupted, *STORAGE_ERRORS):
            raise  # the trial loop marks it FAIL ("interrupted", or the database's fault) and stops
        except Exception as exc:  # the trial's own failure: record it, keep the study going
            reason = describe_failure(exc)
            writer.failed(reason)
            raise TrialFailed(reason) from exc

        stored = time.perf_counter()
        writer.trained(result.layers, result.val_history, result.mean_bits, result.sparsity,
                       None if refinement else result.promoted)
        if result.pruned_reason is not None:
            writer.stopped(result.pruned_reason, {"sample": sample_seconds, **result.seconds})
            raise optuna.TrialPruned(result.pruned_reason)
        put_blob(self.storage, trial.study.study_name, keys.artifact_blob_key(trial.number), result.artifact)
        seconds = {"sample": sample_seconds, **result.seconds, "storage": time.perf_counter() - stored,
                   "total": time.perf_counter() - started}
        writer.completed(result.test_accuracy, result.compression_ratio, seconds, result.teacher_source,
                         torch.get_num_threads(), result.deploy)
        if self.feasible_floor is not None:
            trial.set_constraint(ACCURACY_CONSTRAINT, self.feasible_floor - result.val_accuracy)
        if spec.deploy is not None:
            return result.val_accuracy, float(result.size_bytes), float(result.deploy[spec.deploy])
        return result.val_accuracy, float(result.size_bytes)
