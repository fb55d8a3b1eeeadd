"""From a trial to a compression plan: explicit, per layer, plain serializable data.

Parameter names in the study: ``<layer>.<knob>`` for a per-layer knob (``fc1.prune_ratio``),
``<knob>`` for a tied per-layer knob or a global one (``weight_bits``, ``kd_alpha``). Fixed
knobs are not sampled; the plan still states their value for every layer.

Example:
    >>> import optuna
    >>> from slimtune.spaces import parse_spec
    >>> spec = parse_spec({"study": {"name": "d"}, "model": {"preset": "cnn-digits"},
    ...                    "data": {"preset": "digits"}})
    >>> trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    >>> plan = sample_plan(trial, spec.space, ["conv1", "fc"])
    >>> sorted(plan.layers) == ["conv1", "fc"] and CompressionPlan.from_dict(plan.to_dict()) == plan
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from typing import Any

import optuna

from ._errors import SpecError
from ._knobs import GLOBAL_KNOBS, PER_LAYER_KNOBS, Knob
from ._spec import SpaceSpec


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one compressible layer.

    ``rank_ratio`` < 1 replaces the layer by the two factors of a truncated SVD keeping
    ``max(1, round(rank_ratio * min(out, in * kh * kw)))`` singular values; 1 leaves it whole.
    ``unit_ratio`` < 1 keeps only ``max(1, round(unit_ratio * units))`` of the layer's output
    units (neurons or channels): the others' weights, and the next layer's weights that read
    them, are pruned (see ``slimtune.trainers.apply_plan``).
    """

    prune_ratio: float
    weight_bits: int
    kd_temperature: float
    rank_ratio: float = 1.0
    unit_ratio: float = 1.0


@dataclass(frozen=True)
class CompressionPlan:
    """Per-layer plans (in model order) plus the global distillation and optimizer knobs."""

    layers: dict[str, LayerPlan]
    kd_alpha: float
    feature_kd_weight: float
    lr: float
    l1_weight: float = 0.0
    # The logit-distillation temperature when the output layer is not in ``layers`` (excluded
    # from compression); otherwise the output layer's own ``kd_temperature`` is used.
    logit_temperature: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layers": {name: asdict(p) for name, p in self.layers.items()},
            "kd_alpha": self.kd_alpha,
            "feature_kd_weight": self.feature_kd_weight,
            "lr": self.lr,
            "l1_weight": self.l1_weight,
        }
        if self.logit_temperature is not None:
            out["logit_temperature"] = self.logit_temperature
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionPlan:
        """Read :meth:`to_dict` back; plans stored before ``rank_ratio``/``unit_ratio``/``l1_weight``
        existed get 1, 1 and 0."""
        layers = {name: LayerPlan(float(p["prune_ratio"]), int(p["weight_bits"]), float(p["kd_temperature"]),
                                  float(p.get("rank_ratio", 1.0)), float(p.get("unit_ratio", 1.0)))
                  for name, p in data["layers"].items()}
        logit_temperature = data.get("logit_temperature")
        return cls(layers, float(data["kd_alpha"]), float(data["feature_kd_weight"]), float(data["lr"]),
                   float(data.get("l1_weight", 0.0)),
                   float(logit_temperature) if logit_temperature is not None else None)


def select_layers(candidates: list[str], space: SpaceSpec) -> list[str]:
    """The compressible layers among ``candidates`` (in their order), by the space's patterns.

    Every pattern in ``layers``, ``exclude`` and ``[space.layer.*]`` must match at least one
    candidate, so that a typo is an error rather than a silently smaller search.
    """
    for key, patterns in (("space.layers", space.layers), ("space.exclude", space.exclude),
                          ("space.layer", tuple(space.overrides))):
        for pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in candidates):
                raise SpecError(key, pattern, f"a pattern matching some of the model's Linear/Conv2d layers {candidates}",
                                "matches no layer")
    chosen = [n for n in candidates
              if any(fnmatchcase(n, p) for p in space.layers) and not any(fnmatchcase(n, p) for p in space.exclude)]
    if not chosen:
        raise SpecError("space.layers", list(space.layers), f"patterns leaving at least one of {candidates} after exclude",
                        "selects no layer")
    return chosen


def _suggest(trial: optuna.Trial, param: str, knob: Knob) -> float | int:
    if knob.fixed is not None:
        return knob.fixed
    if knob.choices is not None:
        return trial.suggest_categorical(param, list(knob.choices))
    assert knob.low is not None and knob.high is not None
    return trial.suggest_float(param, knob.low, knob.high, log=knob.log)


def sample_plan(trial: optuna.Trial, space: SpaceSpec, layer_names: list[str],
                output_layer: str | None = None) -> CompressionPlan:
    """Sample a plan for ``layer_names`` (already selected with :func:`select_layers`).

    ``output_layer`` names the layer producing the logits: its ``kd_temperature`` is the
    logit-distillation temperature, sampled (as ``<output_layer>.kd_temperature``) even when
    the layer itself is excluded from compression.
    """
    values: dict[str, dict[str, float | int]] = {name: {} for name in layer_names}
    for knob_name in PER_LAYER_KNOBS:
        knob = space.knobs[knob_name]
        tied = _suggest(trial, knob_name, knob) if knob.tie and any(
            knob_name not in _fixed_for(name, space) for name in layer_names) else None
        for name in layer_names:
            fixed = _fixed_for(name, space)
            if knob_name == "unit_ratio" and name == output_layer:
                values[name][knob_name] = 1.0  # the logits: every class stays
            elif knob_name in fixed:
                values[name][knob_name] = fixed[knob_name]
            elif tied is not None:
                values[name][knob_name] = tied
            else:
                values[name][knob_name] = _suggest(trial, f"{name}.{knob_name}", knob)
    layers = {name: LayerPlan(float(v["prune_ratio"]), int(v["weight_bits"]), float(v["kd_temperature"]),
                              float(v["rank_ratio"]), float(v["unit_ratio"]))
              for name, v in values.items()}
    glob = {k: float(_suggest(trial, k, space.knobs[k])) for k in GLOBAL_KNOBS}
    logit_temperature = None
    if output_layer is not None and output_layer not in layers:
        knob = space.knobs["kd_temperature"]
        fixed = _fixed_for(output_layer, space).get("kd_temperature")
        param = "kd_temperature" if knob.tie else f"{output_layer}.kd_temperature"
        logit_temperature = float(fixed if fixed is not None else _suggest(trial, param, knob))
    return CompressionPlan(layers, glob["kd_alpha"], glob["feature_kd_weight"], glob["lr"], glob["l1_weight"],
                           logit_temperature)


def _fixed_for(layer: str, space: SpaceSpec) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for pattern, fixed in space.overrides.items():
        if fnmatchcase(layer, pattern):
            out.update(fixed)
    return out
