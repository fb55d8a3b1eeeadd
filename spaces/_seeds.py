"""Seeded plans: the grid a sensitivity pass measures, and the plans a study runs first.

A *sensitivity* is what compressing one layer alone costs before any fine-tune: for each
compressible layer and each value on a coarse grid of its searched knobs (every bit width of the
space, a few prune ratios, unit and rank shares), the validation score and the packed bytes of the
teacher with only that change from what every trial holds (its fixed values;
``slimtune.trainers.sensitivity_pass`` measures them). From them, :func:`seed_params` allocates
plans at several sizes (a Lagrangian sweep of the multiple-choice knapsack "least estimated drop for
the bytes": each layer picks ``argmin drop + λ·bytes``, which gives the allocations on the lower
convex hull, HAWQ-V3's integer program without a solver), and spreads uniform plans (every layer
alike) over the size range. They are Optuna parameters to enqueue (``study.enqueue_trial``); the
knobs they leave out (tied knobs, the distillation recipe) are the sampler's.

Example:
    >>> from slimtune.spaces import parse_spec
    >>> spec = parse_spec({"study": {"name": "d"}, "model": {"preset": "cnn-digits"},
    ...                    "data": {"preset": "digits"}})
    >>> grid = sensitivity_grid(spec.space, ["conv1", "fc"], output_layer="fc")
    >>> [value for knob, value in grid["fc"] if knob == "weight_bits"]
    [2, 3, 4, 5, 6, 8]
    >>> uniform_params(spec.space, ["conv1", "fc"], "fc", count=1)[0]["fc.weight_bits"]
    4
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping
from typing import Any

from ._knobs import NO_NEUTRAL, KnobDeclaration
from ._methods import per_layer_knobs
from ._plan import _fixed_for

# Where a float knob is measured, from its mild end (the one nearer its neutral value) to its strong
# end: thirds, then halved twice toward the strong end, where a layer's drop climbs steepest (a
# prune ratio of 0.82 may cost a fifth of a point where 0.98 costs fifteen).
GRID_FRACTIONS = (0.0, 1 / 3, 2 / 3, 5 / 6, 11 / 12, 1.0)
MAX_CALIBRATION = 10.0  # the most a calibrated wave trusts fine-tuning to recover: 10x the pass's drops
UNIFORM_STEPS = 100  # grid positions a capped uniform seed is chosen among
LAMBDA_STEPS = 400  # the sweep's prices per byte (log-spaced): enough to reach every hull point of a small net


def _searched(space: Any, layer: str, output_layer: str | None,
              inert: Mapping[str, Collection[str]] | None) -> list[tuple[KnobDeclaration, Any]]:
    """The knobs sampled for ``layer`` that compress (they have a neutral value), with the space's knob."""
    out = []
    fixed = _fixed_for(layer, space)
    for decl in per_layer_knobs():
        knob = space.knobs[decl.name]
        if decl.neutral is NO_NEUTRAL or knob.fixed is not None or decl.name in fixed:
            continue
        if (decl.output_value is not None and layer == output_layer) or layer in (inert or {}).get(decl.name, ()):
            continue
        out.append((decl, knob))
    return out


def _values(decl: KnobDeclaration, knob: Any) -> list[float | int]:
    """A knob's grid, its neutral value left out: every choice, or a few points of its range."""
    if knob.choices is not None:
        values: list[float | int] = list(knob.choices)
    else:
        mild, strong = ((knob.low, knob.high) if abs(knob.low - decl.neutral) <= abs(knob.high - decl.neutral)
                        else (knob.high, knob.low))
        values = sorted({min(knob.high, max(knob.low, round(mild + f * (strong - mild), 4)))
                         for f in GRID_FRACTIONS})  # rounded, yet inside the range the sampler accepts
    return [v for v in values if v != decl.neutral]


def sensitivity_grid(space: Any, layer_names: list[str], output_layer: str | None = None,
                     inert: Mapping[str, Collection[str]] | None = None) -> dict[str, list[tuple[str, float | int]]]:
    """For each layer, the ``(knob, value)`` changes the sensitivity pass measures one at a time."""
    return {name: [(decl.name, value) for decl, knob in _searched(space, name, output_layer, inert)
                   for value in _values(decl, knob)] for name in layer_names}


def _tied(space: Any, knob: str) -> bool:
    return bool(space.knobs[knob].tie)


def _uniform_plan(space: Any, layer_names: list[str], output_layer: str | None, share: float,
                  inert: Mapping[str, Collection[str]] | None) -> dict[str, float | int]:
    """Every searched compression knob at position ``share`` of its grid from its neutral end."""
    params: dict[str, float | int] = {}
    for name in layer_names:
        for decl, knob in _searched(space, name, output_layer, inert):
            outward = sorted(_values(decl, knob), key=lambda v: abs(v - decl.neutral))  # mild first
            if outward:
                value = outward[min(len(outward) - 1, int(share * len(outward)))]
                params[decl.name if _tied(space, decl.name) else f"{name}.{decl.name}"] = value
    return params


def estimated_drop(sensitivity: Mapping[str, Any], params: Mapping[str, float | int]) -> float:
    """The first-order drop of a plan's compression knobs (``layer.knob`` or tied ``knob`` keys):
    the sum of the measured single-layer drops of its values (a knob's neutral value costs nothing;
    a value the pass did not measure costs what the nearest measured one does)."""
    neutral = {d.name: d.neutral for d in per_layer_knobs()}
    base = sensitivity["base_score"]
    total = 0.0
    for name, entry in sensitivity["layers"].items():
        for knob in {p["knob"] for p in entry["points"]}:
            value = params.get(f"{name}.{knob}", params.get(knob))
            if value is None or value == neutral.get(knob):
                continue
            measured = [p for p in entry["points"] if p["knob"] == knob]
            nearest = min(measured, key=lambda p: abs(p["value"] - value))
            total += max(0.0, base - nearest["score"]) if math.isfinite(nearest["score"]) else math.inf
    return total


def _spread(ordered: list[Any], count: int) -> list[Any]:
    """``count`` items of ``ordered`` spread evenly from its first to its last (all when fewer)."""
    if len(ordered) <= count:
        return ordered
    if count == 1:
        return [ordered[len(ordered) // 2]]
    return [ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)]


def uniform_params(space: Any, layer_names: list[str], output_layer: str | None, count: int,
                   inert: Mapping[str, Collection[str]] | None = None, sensitivity: Mapping[str, Any] | None = None,
                   max_drop: float = math.inf) -> list[dict[str, float | int]]:
    """``count`` plans compressing every layer alike, from mild to strong: plan ``i`` sets each
    searched knob at position ``(i + 1) / (count + 1)`` of its grid from its neutral end. With a
    ``sensitivity`` pass, the distinct plans of the grid whose :func:`estimated_drop` is at most
    ``max_drop``, spread from the mildest to the strongest (none when no plan is under it)."""
    if sensitivity is None:
        return [_uniform_plan(space, layer_names, output_layer, (i + 1) / (count + 1), inert) for i in range(count)]
    distinct: list[dict[str, float | int]] = []
    for step in range(UNIFORM_STEPS):
        plan = _uniform_plan(space, layer_names, output_layer, step / UNIFORM_STEPS, inert)
        if plan not in distinct:
            distinct.append(plan)
    return _spread([p for p in distinct if estimated_drop(sensitivity, p) <= max_drop], count)


def _neutral_allowed(space: Any, knob: str) -> bool:
    """Whether the space lets a seed leave ``knob`` at its neutral value (no pruning, 32 bits)."""
    decl, searched = next(d for d in per_layer_knobs() if d.name == knob), space.knobs[knob]
    if searched.choices is not None:
        return decl.neutral in searched.choices
    return searched.low <= decl.neutral <= searched.high


def _layer_options(points: list[dict[str, Any]], space: Any, base_score: float, base_bytes: int,
                   layer_bytes: float) -> list[tuple[dict[str, float | int], float, float]]:
    """Every combination of one layer's measured values: ``(values, estimated drop, estimated bytes
    saved)``. Drops add up (first order); the bytes a combination keeps are the layer's bytes times
    each change's kept share (bits and sparsity multiply). A knob's neutral value is a choice only
    where the space allows it; elsewhere every seed sets the knob to a measured value."""
    by_knob: dict[str, list[tuple[float | int, float, float]]] = {}
    for point in points:
        drop = max(0.0, base_score - point["score"]) if math.isfinite(point["score"]) else math.inf
        kept = min(1.0, max(0.0, 1.0 - (base_bytes - point["bytes"]) / max(layer_bytes, 1.0)))
        by_knob.setdefault(point["knob"], []).append((point["value"], drop, kept))
    knobs = sorted(by_knob)
    neutral = {d.name: d.neutral for d in per_layer_knobs()}
    choices = [[*([(neutral[k], 0.0, 1.0)] if _neutral_allowed(space, k) else []), *by_knob[k]] for k in knobs]
    options = []
    for combo in itertools.product(*choices):
        values = {k: v for k, (v, _, _) in zip(knobs, combo)}
        drop = sum(d for _, d, _ in combo)
        kept = math.prod(s for _, _, s in combo)
        options.append((values, drop, layer_bytes * (1.0 - kept)))
    return options


def seed_params(sensitivity: Mapping[str, Any], space: Any, count: int,
                max_drop: float = math.inf, above: float = -math.inf) -> list[dict[str, float | int]]:
    """``count`` allocations from a stored sensitivity pass, spread over the sizes the sweep reaches
    (smallest estimated drop at each size; mild to strong; never the dense plan) among those whose
    estimated drop is at most ``max_drop`` (the study's floor: a seed below it would be pruned) and
    more than ``above`` (the calibrated wave: beyond the first seeds' strongest).
    Knobs tied across layers are left to the sampler: one layer cannot differ from another there."""
    if count <= 0:
        return []
    layers = {name: _layer_options([p for p in entry["points"] if not _tied(space, p["knob"])], space,
                                   sensitivity["base_score"], sensitivity["base_bytes"], entry["bytes"])
              for name, entry in sensitivity["layers"].items()}
    layers = {name: options for name, options in layers.items() if options and options[0][0]}
    finite = [d for options in layers.values() for _, d, s in options if math.isfinite(d) and d > 0 and s > 0]
    savings = [s for options in layers.values() for _, _, s in options if s > 0]
    if not savings:
        return []
    low = min(finite, default=1e-6) / max(savings) / 10
    high = max(finite, default=1.0) / min(savings) * 10
    found: dict[tuple, tuple[float, dict[str, float | int]]] = {}
    for step in range(LAMBDA_STEPS):
        price = low * (high / low) ** (step / (LAMBDA_STEPS - 1))  # the value of a byte saved, in score
        params: dict[str, float | int] = {}
        saved = drop = 0.0
        for name, options in layers.items():
            values, layer_drop, bytes_saved = min(options, key=lambda o: (o[1] - price * o[2], -o[2]))
            params.update({f"{name}.{knob}": value for knob, value in values.items()})
            saved += bytes_saved
            drop += layer_drop
        if saved > 0 and above < drop <= max_drop:  # the dense plan is no seed
            found.setdefault(tuple(sorted(params.items())), (saved, params))
    return _spread([params for _, params in sorted(found.values(), key=lambda item: item[0])], count)


def calibration(drops: list[tuple[float, float]], most: float = MAX_CALIBRATION) -> float:
    """How many times the pass's estimates overstate what fine-tuned plans lose, from finished
    seeds' ``(estimated, measured)`` drops: the sum of the estimates over the sum of the measured
    drops (negative ones count as 0), so the strong seeds decide and the mild ones' noise does
    not; at most ``most`` (when the seeds lost next to nothing). Below 1 the pass understates.

    >>> round(calibration([(0.002, 0.001), (0.018, 0.004)]), 6), calibration([(0.01, -0.001)])
    (4.0, 10.0)
    """
    estimated = sum(max(0.0, e) for e, _ in drops if math.isfinite(e))
    measured = sum(max(0.0, m) for e, m in drops if math.isfinite(e))
    if estimated <= 0:
        return 1.0
    return min(most, estimated / measured) if measured > 0 else most
