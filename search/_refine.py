"""The refinement stage (``[search.refine]``): the best plans of a search, trained again.

A search trial is a short, noisy measurement: a few epochs, one seed. At the end of a search
run, the stage takes the feasible Pareto plans whose validation accuracy is within
``search.refine.within`` of the teacher's, smallest first, and runs each again as a new
trial of the same study (same parameters, enqueued; a new trial number, so a fresh seed) that
trains ``epochs`` plus ``refine_epochs`` more epochs with a cosine decay. The new trial carries
``refines = <source trial number>``; once it has finished, :func:`~slimtune.studies.pareto_trials`
judges the plan by it alone, so the front holds the longer, independent measurement and not the
lucky short one. At most ``refine_top`` plans are refined per study, shared by every worker
(the choice and the enqueue run under the study's slot lock).

Candidates come from the search's own front (:func:`~slimtune.studies.refine_candidates`, from
:func:`~slimtune.studies.search_front`), where
every plan stands at the search's fidelity: a refinement, trained many more epochs, would
otherwise dominate its short neighbours and leave the stage nothing to refine.

With a deadline, :func:`refine_until_deadline` does not leave time unused: when the stage runs
out of candidates early (``refine_top`` not reached, no other in-band plan on the search's
front), the search goes on one trial at a time, and each new in-band plan on that front is
refined as it appears.

Example::

    ran = run_refinement(study, storage, objective, spec, stop, teacher_val=0.9817)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimtune.spaces import StudySpec
from slimtune.studies import finished_count, refine_candidates, refinement_attrs

from ._loop import ask_enqueued, run_one_trial, slot_lock
from ._signals import GracefulStop


def run_refinement(study: optuna.Study, storage: optuna.storages.BaseStorage,
                   objective: Callable[[optuna.Trial], object], spec: StudySpec, stop: GracefulStop,
                   teacher_val: float, deadline: float | None = None,
                   callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None) -> int:
    """Refine candidates one at a time until none is left, ``deadline`` (``time.monotonic``)
    passes or a signal arrives; a plan whose refinement failed here is not tried again in
    this run. Returns the number of refinement trials this process ran."""
    refine = spec.search.refine
    ran = 0
    tried: set[int] = set()
    while refine.epochs > 0 and not stop.requested:
        if deadline is not None and time.monotonic() >= deadline:
            break
        with slot_lock(storage, spec.storage, study.study_name):
            candidates = [t for t in refine_candidates(study, teacher_val, refine.within, refine.top)
                          if t.number not in tried]
            if not candidates:
                break
            source = candidates[0]
            tried.add(source.number)
            trial = ask_enqueued(study, storage, source.params, refinement_attrs(source.number))
        frozen = run_one_trial(study, storage, objective, trial)
        ran += 1
        for callback in callbacks or []:
            callback(study, frozen)
    return ran


def refine_until_deadline(study: optuna.Study, storage: optuna.storages.BaseStorage,
                          objective: Callable[[optuna.Trial], object], spec: StudySpec, stop: GracefulStop,
                          teacher_val: float, search: Callable[[int, float | None], int], deadline: float | None,
                          callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None) -> int:
    """The refinement stage, then, while time is left before ``deadline``: one more search trial
    (``search(target, deadline)`` runs trials until the study holds ``target`` finished ones and
    returns how many it ran) and the stage again, until the deadline, a signal, or the study's
    trial target. Without a deadline the stage runs once. Returns the trials this process ran.

    Example::

        ran = refine_until_deadline(study, storage, objective, spec, stop, 0.9817,
                                    search=lambda target, until: run_until_target(...), deadline=deadline)
    """
    ran = 0
    while True:
        ran += run_refinement(study, storage, objective, spec, stop, teacher_val, deadline, callbacks)
        if spec.search.refine.epochs == 0 or deadline is None or stop.requested or time.monotonic() >= deadline:
            return ran
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))  # other workers' trials
        more = search(min(spec.trials, finished_count(study) + running + 1), deadline)
        if more == 0:  # the trial target is met (or no slot is left to this worker)
            return ran
        ran += more
