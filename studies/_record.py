"""One trial, as slimtune records it: written by one writer, read by one reader.

The objective writes a trial's record as it goes, through :class:`TrialWriter` (the plan and who
runs it when it starts, what training achieved, then the results or the reason it stopped), as
Optuna user attrs named in :mod:`._keys` (so the dashboard shows them, and a study written by an
earlier release reads the same way). Every report, frame, selection and benchmark reads a trial
through :meth:`TrialRecord.of`, never by attr names.

Example:
    >>> import optuna
    >>> study = optuna.create_study(directions=["maximize", "minimize"])
    >>> trial = study.ask()
    >>> writer = TrialWriter(trial)
    >>> writer.started({"host": "h", "pid": 1, "run": "r"}, {"layers": {}, "lr": 0.001})
    >>> writer.trained(layers={}, val_history=[0.9], mean_bits=4.0, sparsity=0.5, promoted=None)
    >>> writer.completed(test_accuracy=0.91, compression_ratio=12.0, seconds={"total": 1.0}, teacher_source="cache",
    ...                  threads=1)
    >>> record = TrialRecord.of(study.tell(trial, [0.9, 1000.0]))
    >>> record.val_accuracy, record.size_bytes, record.test_accuracy, record.reason
    (0.9, 1000, 0.91, 'completed')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import _keys as keys

COMPLETED = "completed"


@dataclass(frozen=True)
class TrialRecord:
    """What slimtune knows about one trial. ``val_accuracy`` and ``size_bytes`` are its two
    objectives (``None`` unless it completed); ``layers`` is what each method achieved per layer
    (sparsity, bits, weights, rank, units); ``seconds`` the time of each phase; ``reason`` why it
    ended (``"completed"``, the accuracy floor, or its failure)."""

    number: int
    state: TrialState
    val_accuracy: float | None = None
    size_bytes: int | None = None
    test_accuracy: float | None = None
    compression_ratio: float | None = None
    mean_bits: float | None = None
    sparsity: float | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    val_history: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None
    fail_reason: str | None = None
    promoted: bool | None = None
    refines: int | None = None
    seeded: str | None = None
    teacher_source: str | None = None
    torch_threads: int | None = None
    worker: dict[str, Any] | None = None
    feasible: bool = True
    params: dict[str, Any] = field(default_factory=dict)
    deploy: dict[str, float] = field(default_factory=dict)  # [objective] deploy: onnx_bytes, latency_ms, batch

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialRecord:
        """The record of a stored trial (any slimtune release's; attrs a release did not write are empty)."""
        attrs = trial.user_attrs
        values = trial.values if trial.state == TrialState.COMPLETE and trial.values else None
        return cls(
            number=trial.number, state=trial.state,
            val_accuracy=float(values[0]) if values else None,
            size_bytes=int(values[1]) if values else None,
            test_accuracy=attrs.get(keys.TRIAL_TEST_ACCURACY),
            compression_ratio=attrs.get(keys.TRIAL_RATIO),
            mean_bits=attrs.get(keys.TRIAL_MEAN_BITS),
            sparsity=attrs.get(keys.TRIAL_SPARSITY),
            plan=attrs.get(keys.TRIAL_PLAN) or {},
            layers=attrs.get(keys.TRIAL_LAYERS) or {},
            val_history=list(attrs.get(keys.TRIAL_VAL_HISTORY) or []),
            seconds=attrs.get(keys.TRIAL_SECONDS) or {},
            stop_reason=attrs.get(keys.TRIAL_STOP_REASON),
            fail_reason=attrs.get(keys.TRIAL_FAIL_REASON),
            promoted=attrs.get(keys.TRIAL_PROMOTED),
            refines=attrs.get(keys.TRIAL_REFINES),
            seeded=attrs.get(keys.TRIAL_SEEDED),
            teacher_source=attrs.get(keys.TRIAL_TEACHER_SOURCE),
            torch_threads=attrs.get(keys.TRIAL_THREADS),
            worker=attrs.get(keys.TRIAL_WORKER),
            feasible=all(v <= 0 for v in trial.constraints.values()),
            params=dict(trial.params),
            deploy=dict(attrs.get(keys.TRIAL_DEPLOY) or {}),
        )

    @property
    def reason(self) -> str | None:
        """Why the trial ended: its failure, else its stop reason."""
        return self.fail_reason or self.stop_reason

    @property
    def last_val_accuracy(self) -> float | None:
        """The validation accuracy after its last epoch (a pruned trial has no objective values)."""
        return self.val_history[-1] if self.val_history else self.val_accuracy

    def val_after(self, epochs: int) -> float | None:
        """Its validation accuracy after ``epochs`` epochs (its final one when it trained fewer)."""
        return self.val_history[epochs - 1] if len(self.val_history) >= epochs else self.val_accuracy


def refines_of(trial: optuna.Trial | FrozenTrial) -> int | None:
    """The trial whose plan ``trial`` trains again (the refinement stage enqueues it so), or ``None``."""
    return trial.user_attrs.get(keys.TRIAL_REFINES)


def refinement_attrs(source: int) -> dict[str, Any]:
    """The user attrs that mark an enqueued trial as the refinement of trial ``source``."""
    return {keys.TRIAL_REFINES: source}


def records(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[TrialRecord]:
    """Every trial of ``study`` (of ``states``), by number, as records."""
    return [TrialRecord.of(t) for t in study.get_trials(deepcopy=False, states=states)]


class TrialWriter:
    """The one writer of a trial's record (see the module docstring). A write to a trial another
    worker already finished (it failed it as stale) is skipped where noted."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def started(self, worker: dict[str, Any], plan: dict[str, Any] | None = None) -> None:
        """Who runs it (host, pid, run id), and its plan once sampled."""
        self.trial.set_user_attr(keys.TRIAL_WORKER, worker)
        if plan is not None:
            self.planned(plan)

    def planned(self, plan: dict[str, Any]) -> None:
        self.trial.set_user_attr(keys.TRIAL_PLAN, plan)

    def trained(self, layers: dict[str, dict[str, float]], val_history: list[float], mean_bits: float,
                sparsity: float, promoted: bool | None) -> None:
        """What the fine-tune achieved; ``promoted``: whether the promotion gate gave it more epochs."""
        self.trial.set_user_attr(keys.TRIAL_LAYERS, layers)
        self.trial.set_user_attr(keys.TRIAL_VAL_HISTORY, val_history)
        self.trial.set_user_attr(keys.TRIAL_MEAN_BITS, mean_bits)
        self.trial.set_user_attr(keys.TRIAL_SPARSITY, sparsity)
        if promoted is not None:
            self.trial.set_user_attr(keys.TRIAL_PROMOTED, promoted)

    def stopped(self, reason: str, seconds: dict[str, float]) -> None:
        """It stopped early (the accuracy floor): it will be PRUNED."""
        self.trial.set_user_attr(keys.TRIAL_STOP_REASON, reason)
        self.trial.set_user_attr(keys.TRIAL_SECONDS, seconds)

    def completed(self, test_accuracy: float, compression_ratio: float, seconds: dict[str, float],
                  teacher_source: str, threads: int, deploy: dict[str, float] | None = None) -> None:
        """Its results beside the objectives (which ``study.tell`` records); ``deploy``: what its
        integer ONNX weighs and how fast it ran (``[objective] deploy``)."""
        if deploy:
            self.trial.set_user_attr(keys.TRIAL_DEPLOY, deploy)
        self.trial.set_user_attr(keys.TRIAL_TEST_ACCURACY, test_accuracy)
        self.trial.set_user_attr(keys.TRIAL_RATIO, compression_ratio)
        self.trial.set_user_attr(keys.TRIAL_STOP_REASON, COMPLETED)
        self.trial.set_user_attr(keys.TRIAL_SECONDS, seconds)
        self.trial.set_user_attr(keys.TRIAL_TEACHER_SOURCE, teacher_source)
        self.trial.set_user_attr(keys.TRIAL_THREADS, threads)

    def failed(self, reason: str) -> None:
        """Why it failed (``Type: first line``, or ``interrupted``); skipped if the trial is
        already finished (another worker failed it as stale)."""
        try:
            self.trial.set_user_attr(keys.TRIAL_FAIL_REASON, reason)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
