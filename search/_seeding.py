"""Seeding a study (``[search.seed]``): the sensitivity pass, once, then plans enqueued before the sampler's.

The first process to reach a study with seeding on measures the pass
(``slimtune.trainers.sensitivity_pass``) and stores it insert-if-absent (the ``sensitivity``
blob); only the process whose write landed enqueues the seeds, so a study gets them once however
many workers start together, and ``resume`` reuses the stored pass. Seeded trials carry the
``seeded`` attr (``"sensitivity"`` or ``"uniform"``); Optuna runs enqueued trials before it samples.

Example::

    seeded = seed_study(study, storage, context, log)   # 0 when already seeded or seeding is off
"""

from __future__ import annotations

import json
from typing import Any

import optuna

from slimtune.spaces import seed_params, uniform_params
from slimtune.studies import claim_blob, keys, stored_sensitivity
from slimtune.trainers import TrialContext, sensitivity_pass


def seed_study(study: optuna.Study, storage: optuna.storages.BaseStorage, context: TrialContext, log: Any) -> int:
    """Measure and store the pass and enqueue the seeds unless the study has them; the number enqueued."""
    seed = context.spec.search.seed
    if (seed.plans == 0 and seed.uniform == 0) or stored_sensitivity(storage, study.study_name) is not None:
        return 0
    room = max(0, context.spec.trials - len(study.get_trials(deepcopy=False)))
    if room == 0:  # the study holds its target: no seed could run, so the pass waits for a larger one
        return 0
    sensitivity = sensitivity_pass(context, seed.samples)
    if not claim_blob(storage, study.study_name, keys.SENSITIVITY_BLOB, json.dumps(sensitivity).encode()):
        return 0  # another worker stored it first, and seeds the study
    space, layers = context.spec.space, context.layer_names
    floor = context.spec.max_accuracy_drop  # a seed estimated below the floor would only be pruned
    seeds = [("sensitivity", p) for p in seed_params(sensitivity, space, seed.plans, floor)]
    seeds += [("uniform", p) for p in uniform_params(space, layers, context.output_layer, seed.uniform,
                                                     context.inert, sensitivity, floor)]
    asked = seed.plans + seed.uniform
    seeds = seeds[:room]  # never more than the target leaves: a seed beyond it would wait in the study
    for kind, params in seeds:
        study.enqueue_trial(params, user_attrs={keys.TRIAL_SEEDED: kind})
    points = sum(len(entry["points"]) for entry in sensitivity["layers"].values())
    log(f"sensitivity pass: {points} single-layer plans over {len(sensitivity['layers'])} layers on "
        f"{sensitivity['samples']} validation samples in {sensitivity['seconds']:.1f} s; seeded "
        f"{len(seeds)} plans ({sum(k == 'sensitivity' for k, _ in seeds)} allocated, "
        f"{sum(k == 'uniform' for k, _ in seeds)} uniform" + (f"; {asked} asked for: the others are estimated "
        "below the floor, repeat a plan, or exceed the trial target" if len(seeds) < asked else "") + ")")
    return len(seeds)
