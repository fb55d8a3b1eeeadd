"""The Optuna objective: sample a plan, run the trial, record everything, return the objectives.

Returns ``(val_accuracy, size_bytes)``. Per-trial user attrs hold the plan, the achieved
per-layer sparsity and bits, test accuracy, compression ratio, timings and the stop reason. A
trial below the accuracy floor after an epoch is PRUNED (reason recorded); a trial that raises
is FAIL with ``fail_reason`` recorded, and the study goes on. The packed artifact of a
completed trial is stored in the study database (``trial/<n>/artifact``). With
``finetune.promote_epochs``, whether the trial earned its extra epochs is the ``promoted`` attr
(rule: :func:`beaten_by_completed`). With ``study.feasible_drop`` set, each completed trial
carries the Optuna constraint ``accuracy_drop`` = ``feasible_floor - val_accuracy`` (feasible
when <= 0), so the samplers and the Pareto front (:func:`~slimtune.studies.pareto_trials`) keep
to trials within that drop of the teacher. A trial carrying the ``refines`` attr (enqueued by the
refinement stage, ``_refine``) trains ``finetune.refine_epochs`` extra epochs, unconditionally.

Example::

    objective = CompressionObjective(context, storage, stop)
    study.optimize(objective, n_trials=5, catch=(TrialFailed,))
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import optuna
import torch

from slimtune.spaces import sample_plan
from slimtune.studies import STORAGE_ERRORS, keys, put_blob
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
        for done in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            history = done.user_attrs.get(keys.TRIAL_VAL_HISTORY) or []
            accuracy = history[base_epochs - 1] if len(history) >= base_epochs else done.values[0]
            if done.values[1] <= size_tolerance * size_bytes and accuracy > val_accuracy + margin:
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

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        started = time.perf_counter()
        trial.set_user_attr(keys.TRIAL_WORKER, self.worker)
        spec = self.context.spec
        plan = sample_plan(trial, spec.space, self.context.layer_names, self.context.output_layer)
        trial.set_user_attr(keys.TRIAL_PLAN, plan.to_dict())
        sample_seconds = time.perf_counter() - started
        try:
            with self.stop.trial_body():
                if keys.TRIAL_REFINES in trial.user_attrs:  # the refinement stage: train the plan longer
                    result = run_trial(self.context, plan, seed=spec.seed + trial.number,
                                       promote=lambda accuracy, size: True, extra_epochs=spec.finetune.refine_epochs)
                else:
                    result = run_trial(self.context, plan, seed=spec.seed + trial.number,
                                       promote=beaten_by_completed(trial.study, spec.finetune.promote_margin,
                                                                   spec.finetune.epochs,
                                                                   spec.finetune.promote_size_tolerance))
        except (Interrupted, *STORAGE_ERRORS):
            raise  # the trial loop marks it FAIL ("interrupted", or the database's fault) and stops
        except Exception as exc:  # the trial's own failure: record it, keep the study going
            reason = describe_failure(exc)
            trial.set_user_attr(keys.TRIAL_FAIL_REASON, reason)
            raise TrialFailed(reason) from exc

        stored = time.perf_counter()
        trial.set_user_attr(keys.TRIAL_LAYERS, result.layers)
        trial.set_user_attr(keys.TRIAL_VAL_HISTORY, result.val_history)
        trial.set_user_attr(keys.TRIAL_MEAN_BITS, result.mean_bits)
        trial.set_user_attr(keys.TRIAL_SPARSITY, result.sparsity)
        if result.promoted is not None and keys.TRIAL_REFINES not in trial.user_attrs:
            trial.set_user_attr(keys.TRIAL_PROMOTED, result.promoted)
        if result.pruned_reason is not None:
            trial.set_user_attr(keys.TRIAL_STOP_REASON, result.pruned_reason)
            trial.set_user_attr(keys.TRIAL_SECONDS, {"sample": sample_seconds, **result.seconds})
            raise optuna.TrialPruned(result.pruned_reason)
        put_blob(self.storage, trial.study.study_name, keys.artifact_blob_key(trial.number), result.artifact)
        trial.set_user_attr(keys.TRIAL_TEST_ACCURACY, result.test_accuracy)
        trial.set_user_attr(keys.TRIAL_RATIO, result.compression_ratio)
        trial.set_user_attr(keys.TRIAL_STOP_REASON, "completed")
        seconds = {"sample": sample_seconds, **result.seconds, "storage": time.perf_counter() - stored,
                   "total": time.perf_counter() - started}
        trial.set_user_attr(keys.TRIAL_SECONDS, seconds)
        trial.set_user_attr("teacher_outputs", result.teacher_source)
        trial.set_user_attr("torch_threads", torch.get_num_threads())
        if self.feasible_floor is not None:
            trial.set_constraint(ACCURACY_CONSTRAINT, self.feasible_floor - result.val_accuracy)
        return result.val_accuracy, float(result.size_bytes)
