"""From a trial to a compression plan: explicit, per layer, plain serializable data.

Parameter names in the study: ``<layer>.<knob>`` for a per-layer knob (``fc1.prune_ratio``),
``<knob>`` for a tied per-layer knob or a global one (``weight_bits``, ``kd_alpha``). Fixed
knobs are not sampled; the plan still states their value for every layer. The knobs are those
of the registered declarations (:mod:`._methods`), sampled in their order.

Example:
    >>> import optuna
    >>> from slimtune.spaces import parse_spec
    >>> spec = parse_spec({"study": {"name": "d"}, "model": {"preset": "cnn-digits"},
    ...                    "data": {"preset": "digits"}})
    >>> trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    >>> plan = sample_plan(trial, spec.space, ["conv1", "fc"])
    >>> sorted(plan.layers) == ["conv1", "fc"] and CompressionPlan.from_dict(plan.to_dict()) == plan
    True
    >>> LayerPlan(prune_ratio=0.5, weight_bits=4).rank_ratio  # a knob not given is at its neutral value
    1.0
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from fnmatch import fnmatchcase
from typing import Any

import optuna

from ._errors import SpecError
from ._knobs import NO_NEUTRAL, Knob, KnobDeclaration
from ._methods import global_knobs, knob_declarations, per_layer_knobs

# A knob with no neutral value, left out of a plan written by hand, takes this (kd_temperature).
_UNSET_DEFAULTS = {"kd_temperature": 1.0}


def _default(decl: KnobDeclaration) -> float | int:
    if decl.neutral is not NO_NEUTRAL:
        return decl.neutral
    if decl.name in _UNSET_DEFAULTS:
        return _UNSET_DEFAULTS[decl.name]
    fixed = decl.default.get("fixed")
    if fixed is None:
        raise TypeError(f"knob {decl.name!r} has no neutral value: give it")
    return fixed


def _checked(values: Mapping[str, Any], knobs: list[KnobDeclaration], what: str) -> dict[str, float | int]:
    names = {k.name for k in knobs}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"{what} has no knob {unknown[0]!r}; knobs: {sorted(names)}")
    out: dict[str, float | int] = {}
    for decl in knobs:
        value = values[decl.name] if decl.name in values else _default(decl)
        out[decl.name] = int(value) if decl.kind == "int-choice" else float(value)
    return out


class LayerPlan(Mapping[str, Any]):
    """What happens to one compressible layer: a value for every per-layer knob (those not given
    are at their neutral value: no pruning, 32 bits, full rank, every unit), readable as a
    mapping or as attributes (``plan.prune_ratio``).

    ``rank_ratio`` < 1 replaces the layer by the two factors of a truncated SVD keeping
    ``max(1, round(rank_ratio * min(out, in * kh * kw)))`` singular values. ``unit_ratio`` < 1
    keeps only ``max(1, round(unit_ratio * units))`` of the layer's output units (neurons or
    channels): the others' weights, and the next layer's weights that read them, are pruned
    (see ``slimtune.trainers.apply_plan``).
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None, **knobs: Any) -> None:
        object.__setattr__(self, "_values", _checked({**(values or {}), **knobs}, per_layer_knobs(), "a layer plan"))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"a layer plan has no knob {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a LayerPlan is immutable")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerPlan) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        return "LayerPlan(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"


class CompressionPlan:
    """Per-layer plans (in model order) plus the global knobs (``kd_alpha``, ``lr``, ...),
    readable as attributes (``plan.kd_alpha``).

    ``logit_temperature`` is the logit-distillation temperature when the output layer is not in
    ``layers`` (excluded from compression); otherwise the output layer's own ``kd_temperature``.
    """

    def __init__(self, layers: Mapping[str, LayerPlan], logit_temperature: float | None = None,
                 **global_values: Any) -> None:
        self.layers: dict[str, LayerPlan] = dict(layers)
        self.globals: dict[str, float] = {k: float(v) for k, v in
                                          _checked(global_values, global_knobs(), "a plan").items()}
        self.logit_temperature = None if logit_temperature is None else float(logit_temperature)

    def __getattr__(self, name: str) -> Any:
        globals_ = self.__dict__.get("globals", {})
        if name in globals_:
            return globals_[name]
        raise AttributeError(f"a plan has no global knob {name!r}")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CompressionPlan) and self.layers == other.layers and self.globals == other.globals
                and self.logit_temperature == other.logit_temperature)

    def __repr__(self) -> str:
        return f"CompressionPlan(layers={self.layers!r}, globals={self.globals!r})"

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"layers": {name: {knob: value}}, <global knob>: value, ...}``."""
        out: dict[str, Any] = {"layers": {name: dict(p) for name, p in self.layers.items()}, **self.globals}
        if self.logit_temperature is not None:
            out["logit_temperature"] = self.logit_temperature
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionPlan:
        """Read :meth:`to_dict` back; knobs a stored plan does not name (it was written before
        they existed) are at their neutral value."""
        per_layer = {k.name for k in per_layer_knobs()}
        layers = {name: LayerPlan({k: v for k, v in p.items() if k in per_layer}) for name, p in data["layers"].items()}
        names = {k.name for k in global_knobs()}
        return cls(layers, data.get("logit_temperature"), **{k: v for k, v in data.items() if k in names})


def select_layers(candidates: list[str], space: Any, other_modules: Collection[str] = ()) -> list[str]:
    """The compressible layers among ``candidates`` (in their order), by the space's patterns.

    Every pattern in ``layers``, ``exclude`` and ``[space.layer.*]`` must match at least one
    candidate, so that a typo is an error rather than a silently smaller search; a pattern that
    matches only ``other_modules`` (modules of the model no method compresses: the caller says so)
    is not a typo.
    """
    for key, patterns in (("space.layers", space.layers), ("space.exclude", space.exclude),
                          ("space.layer", tuple(space.overrides))):
        for pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in (*candidates, *other_modules)):
                raise SpecError(key, pattern, f"a pattern matching some of the model's compressible layers {candidates}",
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


def sample_plan(trial: optuna.Trial, space: Any, layer_names: list[str],
                output_layer: str | None = None, inert: Mapping[str, Collection[str]] | None = None) -> CompressionPlan:
    """Sample a plan for ``layer_names`` (already selected with :func:`select_layers`).

    ``output_layer`` names the layer producing the logits: knobs with an ``output_value`` take it
    there (every class's unit stays), and knobs ``for_output_layer`` (its ``kd_temperature``, the
    logit temperature) are sampled for it, as ``<output_layer>.<knob>``, even when the layer
    itself is excluded from compression. ``inert`` maps a knob to the layers where it can change
    nothing (``unit_ratio`` of a layer whose units all stay, ``rank_ratio`` of an embedding): there
    it takes its neutral value, unsampled, so the sampler searches only what matters.
    """
    values: dict[str, dict[str, float | int]] = {name: {} for name in layer_names}
    logit_temperature = None
    for decl in per_layer_knobs():
        knob = space.knobs[decl.name]
        tied = _suggest(trial, decl.name, knob) if knob.tie and any(
            decl.name not in _fixed_for(name, space) for name in layer_names) else None
        for name in layer_names:
            value = _unsampled(decl, name, space, output_layer, inert)
            if value is None:
                value = tied if tied is not None else _suggest(trial, f"{name}.{decl.name}", knob)
            values[name][decl.name] = value
    layers = {name: LayerPlan(v) for name, v in values.items()}
    glob = {decl.name: float(_suggest(trial, decl.name, space.knobs[decl.name])) for decl in global_knobs()}
    if output_layer is not None and output_layer not in layers:
        for decl in per_layer_knobs():
            if decl.for_output_layer:
                knob = space.knobs[decl.name]
                fixed = _fixed_for(output_layer, space).get(decl.name)
                param = decl.name if knob.tie else f"{output_layer}.{decl.name}"
                logit_temperature = float(fixed if fixed is not None else _suggest(trial, param, knob))
    return CompressionPlan(layers, logit_temperature, **glob)


def _unsampled(decl: KnobDeclaration, layer: str, space: Any, output_layer: str | None,
               inert: Mapping[str, Collection[str]] | None) -> float | int | None:
    """The value ``sample_plan`` gives ``layer``'s knob without sampling it, or None when it is sampled:
    the output layer's ``output_value``, the neutral value where the knob is inert, a fixed value."""
    if decl.output_value is not None and layer == output_layer:
        return decl.output_value
    if layer in (inert or {}).get(decl.name, ()) and decl.neutral is not NO_NEUTRAL:
        return decl.neutral
    fixed = _fixed_for(layer, space)
    if decl.name in fixed:
        return fixed[decl.name]
    return space.knobs[decl.name].fixed


def unsampled_values(space: Any, layer_names: list[str], output_layer: str | None = None,
                     inert: Mapping[str, Collection[str]] | None = None) -> dict[str, dict[str, float | int]]:
    """Per layer, the compression knobs every trial's plan holds at a value other than neutral
    without sampling them (``[space.<knob>] fixed``, a per-layer override): what a plan that
    changes one layer's searched knob starts from, as the sensitivity pass measures it.

    Example:
        >>> from slimtune.spaces import parse_spec
        >>> spec = parse_spec({"study": {"name": "d"}, "model": {"preset": "cnn-digits"},
        ...                    "data": {"preset": "digits"}, "space": {"weight_bits": {"fixed": 8}}})
        >>> unsampled_values(spec.space, ["conv1", "fc"], output_layer="fc")
        {'conv1': {'weight_bits': 8}, 'fc': {'weight_bits': 8}}
    """
    out: dict[str, dict[str, float | int]] = {name: {} for name in layer_names}
    for decl in per_layer_knobs():
        if decl.neutral is NO_NEUTRAL:
            continue  # a training knob (kd_temperature): it changes no compressed weight
        for name in layer_names:
            value = _unsampled(decl, name, space, output_layer, inert)
            if value is not None and value != decl.neutral:
                out[name][decl.name] = value
    return out


def _fixed_for(layer: str, space: Any) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for pattern, fixed in space.overrides.items():
        if fnmatchcase(layer, pattern):
            out.update(fixed)
    return out


def knob_names() -> list[str]:
    """Every knob, per-layer first: the order of columns and panels."""
    return list(knob_declarations())
