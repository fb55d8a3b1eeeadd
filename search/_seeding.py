"""Seeding a study (``[search.seed]``): the sensitivity pass, once, then plans enqueued before the sampler's.

The first process to reach a study with seeding on measures the pass
(``slimtune.trainers.sensitivity_pass``) and stores it (the ``sensitivity`` blob), holding the
study's slot lock until its seeds are enqueued: workers that start together wait for it instead
of measuring the pass again or sampling trials before the seeds; ``resume`` reuses the stored
pass, and enqueues again the seeds a signal interrupted. Seeded trials carry the ``seeded`` attr
(``"sensitivity"`` or ``"uniform"``); Optuna runs enqueued trials before it samples. A pass that
fails or outlasts the search's deadline leaves the study without seeds (the log says why); a
signal during it stops the run like one during a trial.

Example::

    seeded = seed_study(study, storage, url, context, stop, deadline, log)   # plans enqueued (0: off, no room)
"""

from __future__ import annotations

import json
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from slimtune.spaces import seed_params, sensitivity_grid, uniform_params
from slimtune.studies import claim_blob, keys, stored_sensitivity
from slimtune.trainers import PassOutOfTime, TrialContext, sensitivity_pass

from ._loop import slot_lock
from ._objective import describe_failure
from ._signals import GracefulStop, Interrupted

# the trials that fill the target: finished, running, and enqueued ones (run_until_target runs those first)
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def seed_study(study: optuna.Study, storage: optuna.storages.BaseStorage, url: str, context: TrialContext,
               stop: GracefulStop, deadline: float | None, log: Any) -> int:
    """Measure and store the pass and enqueue the seeds unless the study has them; the number enqueued."""
    seed = context.spec.search.seed
    if (seed.plans == 0 and seed.uniform == 0) or (deadline is not None and time.monotonic() >= deadline):
        return 0  # off, or no time left for a trial (run_study(timeout=0): the teacher only)
    with slot_lock(storage, url, study.study_name):
        room = context.spec.trials - len(study.get_trials(deepcopy=False, states=TAKEN))
        if stored_sensitivity(storage, study.study_name) is not None:
            again = requeue_interrupted_seeds(study, room)
            if again:
                log(f"enqueued again {again} seeded plan{'s' if again > 1 else ''} that a signal interrupted")
            return again
        if room <= 0:  # no seed could run: the pass waits for a larger target
            return 0
        grid = sensitivity_grid(context.spec.space, context.layer_names, context.output_layer, context.inert)
        if not any(grid.values()):  # every compression knob fixed: nothing to measure or seed
            return 0
        try:
            with stop.trial_body():  # a signal ends the pass at once, as it ends a fine-tune
                sensitivity = sensitivity_pass(context, seed.samples, deadline)
        except Interrupted:
            raise
        except PassOutOfTime as exc:
            log(f"sensitivity pass: {exc}; the study runs without seeds")
            return 0
        except Exception as exc:  # a model or data the pass cannot evaluate: the trials may still run
            log(f"sensitivity pass failed ({describe_failure(exc)}); the study runs without seeds")
            return 0
        if not claim_blob(storage, study.study_name, keys.SENSITIVITY_BLOB, json.dumps(sensitivity).encode()):
            return 0  # stored meanwhile by a process that does not take the lock (an older version)
        seeds = _seeds(sensitivity, context, room)
        asked = seed.plans + seed.uniform
        for kind, params in seeds:
            study.enqueue_trial(params, user_attrs={keys.TRIAL_SEEDED: kind})
    points = sum(len(entry["points"]) for entry in sensitivity["layers"].values())
    log(f"sensitivity pass: {points} single-layer plans over {len(sensitivity['layers'])} layers on "
        f"{sensitivity['samples']} validation samples in {sensitivity['seconds']:.1f} s; seeded "
        f"{len(seeds)} plans ({sum(k == 'sensitivity' for k, _ in seeds)} allocated, "
        f"{sum(k == 'uniform' for k, _ in seeds)} uniform" + (f"; {asked} asked for: the others are estimated "
        "below the floor, repeat a plan, or exceed the trial target" if len(seeds) < asked else "") + ")")
    return len(seeds)


def requeue_interrupted_seeds(study: optuna.Study, room: int) -> int:
    """Enqueue again, at most ``room``, the seeds that a signal interrupted (their trial FAIL with
    reason ``interrupted``) and that no later trial retries; the number enqueued. The stored pass
    is not measured again on resume, so without this their plans would be lost. Each interrupted
    attempt is enqueued once (a retry interrupted in turn is enqueued again); a worker killed
    outright is retried by the storage's heartbeat callback instead (up to its retry limit). Call
    it under the slot lock."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    interrupted = [t for t in trials if t.state == TrialState.FAIL and keys.TRIAL_SEEDED in t.user_attrs
                   and t.user_attrs.get(keys.TRIAL_FAIL_REASON) == "interrupted" and t.number not in retried
                   and isinstance(t.system_attrs.get("fixed_params"), dict)]
    for trial in interrupted[:max(0, room)]:
        study.add_trial(optuna.trial.create_trial(  # as study.enqueue_trial, marked as optuna marks its retries
            state=TrialState.WAITING, user_attrs={keys.TRIAL_SEEDED: trial.user_attrs[keys.TRIAL_SEEDED]},
            system_attrs={"fixed_params": trial.system_attrs["fixed_params"], "failed_trial": trial.number}))
    return min(len(interrupted), max(0, room))


def _seeds(sensitivity: dict[str, Any], context: TrialContext, room: int) -> list[tuple[str, dict[str, Any]]]:
    """The allocated, then the uniform plans, at most ``room`` (a seed beyond the trial target would
    wait in the study), each spread over the sizes, mild to strong, and non-empty."""
    seed, space, layers = context.spec.search.seed, context.spec.space, context.layer_names
    # a seed estimated below the floor would only be pruned; fixed values spend part of it in every plan
    floor = context.spec.max_accuracy_drop - max(0.0, sensitivity["dense_score"] - sensitivity["base_score"])
    allocated = [p for p in seed_params(sensitivity, space, min(seed.plans, room), floor) if p]
    uniform = [p for p in uniform_params(space, layers, context.output_layer, min(seed.uniform, room - len(allocated)),
                                         context.inert, sensitivity, floor) if p]
    return [("sensitivity", p) for p in allocated] + [("uniform", p) for p in uniform]
