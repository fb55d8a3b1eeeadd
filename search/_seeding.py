"""Seeding a study (``[search.seed]``): the sensitivity pass, once, then plans enqueued before the sampler's.

The first process to reach a study with seeding on measures the pass
(``slimtune.trainers.sensitivity_pass``) and stores it (the ``sensitivity`` blob), holding the
study's slot lock until its seeds are enqueued: workers that start together wait for it instead
of measuring the pass again or sampling trials before the seeds; ``resume`` reuses the stored
pass, and enqueues again the seeds a signal interrupted. Seeded trials carry the ``seeded`` attr
(``"sensitivity"``, ``"uniform"`` or ``"calibrated"``); Optuna runs enqueued trials before it samples. A pass that
fails or outlasts the search's deadline leaves the study without seeds (the log says why); a
signal during it stops the run like one during a trial.

The pass measures each layer before any fine-tune, and fine-tuning recovers much of that drop,
so the seeds sit on the large end of the front. Once they have finished, :func:`seed_calibrated`
(``calibrated`` plans, called after each trial by every worker) compares their fine-tuned drops
with the pass's estimates and allocates a second wave, stronger than the first, with the
estimates scaled down by that factor; it runs once per study (the ``seed.calibration`` blob,
which records the factor) and its trials carry ``seeded = "calibrated"``.

Example::

    seeded = seed_study(study, storage, url, context, stop, deadline, log)   # plans enqueued (0: off, no room)
    wave = seed_calibrated(study, storage, url, context, log)   # after a trial: 0 until the seeds finished
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from slimtune.spaces import (
    calibration, estimated_drop, per_layer_knobs, seed_params, sensitivity_grid, uniform_params,
)
from slimtune.studies import (
    STORAGE_ERRORS, TrialRecord, claim_blob, clean_sensitivity, get_blob, keys, stored_sensitivity,
)
from slimtune.trainers import PassOutOfTime, TrialContext, sensitivity_pass

from ._loop import slot_lock
from ._objective import describe_failure
from ._signals import GracefulStop, Interrupted

# the trials that fill the target: finished, running, and enqueued ones (run_until_target runs those first)
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
FIRST_WAVE = ("sensitivity", "uniform")  # the seeds enqueued with the pass; "calibrated" ones come after them


def seed_study(study: optuna.Study, storage: optuna.storages.BaseStorage, url: str, context: TrialContext,
               stop: GracefulStop, deadline: float | None, log: Any) -> int:
    """Measure and store the pass and enqueue the seeds unless the study has them; the number enqueued."""
    seed = context.spec.search.seed
    if (seed.plans == 0 and seed.uniform == 0) or (deadline is not None and time.monotonic() >= deadline):
        return 0  # off, or no time left for a trial (run_study(timeout=0): the teacher only)
    again = 0
    with slot_lock(storage, url, study.study_name):
        resumed = stored_sensitivity(storage, study.study_name) is not None
        if resumed:
            room = context.spec.trials - len(study.get_trials(deepcopy=False, states=TAKEN))
            again = requeue_interrupted_seeds(study, room)
    if resumed:
        if again:
            log(f"enqueued again {again} seeded plan{'s' if again > 1 else ''} that a signal interrupted")
        return again + seed_calibrated(study, storage, url, context, log)  # the seeds may have finished before
    with slot_lock(storage, url, study.study_name):
        if stored_sensitivity(storage, study.study_name) is not None:  # stored meanwhile by another worker
            return 0
        room = context.spec.trials - len(study.get_trials(deepcopy=False, states=TAKEN))
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


def seed_calibrated(study: optuna.Study, storage: optuna.storages.BaseStorage, url: str, context: TrialContext,
                    log: Any) -> int:
    """Once the study's first seeds have all finished, enqueue the calibrated wave (``calibrated``
    allocations, at most the room left in the trial target) and store its calibration; the number
    enqueued. Called after every trial: it returns 0 at once when off, done, or still waiting. A
    wave that cannot be allocated (a stored pass this code cannot read) is recorded as done, with
    its reason in the log, and the search goes on.

    The calibration is :func:`~slimtune.spaces.calibration` of the finished seeds' (estimated,
    fine-tuned) drops (a pruned seed's is its last validation score's; what fixed values cost the
    teacher is taken out, as the pass's estimates leave it out); the wave is the allocations
    estimated above the strongest allocated seed and within the floor times that factor."""
    seed = context.spec.search.seed
    if (seed.calibrated == 0 or (seed.plans == 0 and seed.uniform == 0)
            or get_blob(storage, study.study_name, keys.CALIBRATION_BLOB) is not None):
        return 0
    stored = stored_sensitivity(storage, study.study_name)
    if stored is None:
        return 0
    try:
        return _calibrated_wave(study, storage, url, context, _allocatable(stored, context), log)
    except STORAGE_ERRORS:
        raise
    except Exception as exc:  # seeds are a head start: the search goes on without this wave
        claim_blob(storage, study.study_name, keys.CALIBRATION_BLOB, json.dumps({"error": str(exc)}).encode())
        log(f"calibrated seeds failed ({describe_failure(exc)}); the search goes on without them")
        return 0


def _allocatable(stored: Any, context: TrialContext) -> dict[str, Any]:
    """The stored pass (database data) as the allocation reads it: well-formed points of the knobs
    this space searches, every layer's bytes and the base bytes known; ``ValueError`` otherwise."""
    known = {d.name for d in per_layer_knobs()} & set(context.spec.space.knobs)
    data = clean_sensitivity(stored)
    if data is not None:
        layers = {name: {**entry, "points": [p for p in entry["points"] if p["knob"] in known]}
                  for name, entry in data["layers"].items()}
        data = {**data, "layers": {name: entry for name, entry in layers.items() if entry["points"]}}
    if not data or not data["layers"] or "base_bytes" not in data or any(
            entry["bytes"] is None for entry in data["layers"].values()):
        raise ValueError("the stored sensitivity pass has no layer this code can allocate from")
    return data


def _calibrated_wave(study: optuna.Study, storage: optuna.storages.BaseStorage, url: str, context: TrialContext,
                     stored: dict[str, Any], log: Any) -> int:
    wanted = context.spec.search.seed.calibrated
    with slot_lock(storage, url, study.study_name):
        trials = study.get_trials(deepcopy=False)
        first = [t for t in trials if t.user_attrs.get(keys.TRIAL_SEEDED) in FIRST_WAVE]
        if not first:  # the pass seeded nothing (every plan estimated below the floor): nothing to calibrate
            claim_blob(storage, study.study_name, keys.CALIBRATION_BLOB, json.dumps({"plans": 0}).encode())
            return 0
        if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in first):
            return 0  # some seeds still to finish
        room = context.spec.trials - len([t for t in trials if t.state in TAKEN])
        if room <= 0:  # no calibrated plan could run: the wave waits for a larger target
            return 0
        teacher = context.floor + context.spec.max_accuracy_drop  # the teacher's validation score
        fixed = _fixed_cost(stored)
        drops = [(estimated_drop(stored, t.params), teacher - score - fixed) for t in first
                 if (score := _last_score(TrialRecord.of(t))) is not None]
        if not drops:
            return 0  # every seed failed: nothing measured yet (a seed enqueued again on resume may be)
        factor = calibration(drops)
        floor = context.spec.max_accuracy_drop - fixed
        # an allocation's own values: a trial's params hold the sampler's tied knobs too
        strongest = max((estimated_drop(stored, t.system_attrs.get("fixed_params") or t.params) for t in first
                         if t.user_attrs.get(keys.TRIAL_SEEDED) == "sensitivity"), default=-math.inf)
        plans = [p for p in seed_params(stored, context.spec.space, min(wanted, room), floor * factor,
                                        above=strongest) if p]
        record = {"factor": factor, "seeds": len(drops), "estimated": sum(e for e, _ in drops),
                  "measured": sum(m for _, m in drops), "max_drop": floor * factor, "plans": len(plans),
                  "strongest": strongest if math.isfinite(strongest) else None}
        if not claim_blob(storage, study.study_name, keys.CALIBRATION_BLOB, json.dumps(record).encode()):
            return 0
        for params in plans:
            study.enqueue_trial(params, user_attrs={keys.TRIAL_SEEDED: "calibrated"})
    log(f"calibrated seeds: the pass overstated the {len(drops)} finished seeds' fine-tuned drops {factor:.1f}x; "
        f"seeded {len(plans)} plans estimated from {max(strongest, 0.0):.4f} to {floor * factor:.4f}"
        + (f" ({wanted} asked for: no more fit there or in the trial target)" if len(plans) < wanted else ""))
    return len(plans)


def _fixed_cost(sensitivity: dict[str, Any]) -> float:
    """What the values every trial holds (fixed ones) cost the teacher: part of every plan's drop
    that the pass's single-layer estimates leave out."""
    return max(0.0, sensitivity.get("dense_score", sensitivity["base_score"]) - sensitivity["base_score"])


def _last_score(record: TrialRecord) -> float | None:
    """A finished trial's validation score: its objective, or where the floor stopped it."""
    if record.state == TrialState.COMPLETE and record.val_accuracy is not None:
        return record.val_accuracy
    if record.state == TrialState.PRUNED and record.val_history:
        return float(record.val_history[-1])
    return None


def _seeds(sensitivity: dict[str, Any], context: TrialContext, room: int) -> list[tuple[str, dict[str, Any]]]:
    """The allocated, then the uniform plans, at most ``room`` (a seed beyond the trial target would
    wait in the study), each spread over the sizes, mild to strong, and non-empty."""
    seed, space, layers = context.spec.search.seed, context.spec.space, context.layer_names
    # a seed estimated below the floor would only be pruned; fixed values spend part of it in every plan
    floor = context.spec.max_accuracy_drop - _fixed_cost(sensitivity)
    allocated = [p for p in seed_params(sensitivity, space, min(seed.plans, room), floor) if p]
    uniform = [p for p in uniform_params(space, layers, context.output_layer, min(seed.uniform, room - len(allocated)),
                                         context.inert, sensitivity, floor) if p]
    return [("sensitivity", p) for p in allocated] + [("uniform", p) for p in uniform]
