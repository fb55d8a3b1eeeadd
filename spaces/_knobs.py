"""Knobs: the values a plan holds for each layer (or for the whole trial), declared once by their method.

A :class:`KnobDeclaration` says what values a knob may take, how it is searched when the spec
says nothing, and its *neutral* value (with it the method does nothing: no pruning, 32 bits,
full rank). A spec's ``[space]`` section then writes each knob as a small table::

    [space.prune_ratio]   low = 0.0, high = 0.95          # searched per layer
    [space.weight_bits]   choices = [2, 4, 8], tie = true # one value shared by all layers
    [space.kd_alpha]      fixed = 0.7                     # not searched

Example:
    >>> decl = KnobDeclaration("prune_ratio", "float", {"low": 0.0, "high": 0.95}, 0.0, 1.0,
    ...                        high_open=True, allowed_text="a fraction in [0, 1)", neutral=0.0)
    >>> parse_knob("space.prune_ratio", {"low": 0.1, "high": 0.9}, decl).describe()
    'float in [0.1, 0.9]'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ._errors import SpecError

VALID_BITS = tuple(range(2, 17)) + (32,)
BITS_ALLOWED = "integers 2..16, or 32 (unquantized)"
NO_NEUTRAL: Any = None  # a knob that always does something (a temperature, a learning rate)


@dataclass(frozen=True)
class KnobDeclaration:
    """One knob: its ``kind`` (``"float"``, or ``"int-choice"`` over ``choices``), the search
    it gets when the spec says nothing (``default``, a knob table), its range, and ``neutral``
    (the value with which it changes nothing; a knob left at ``{fixed = neutral}`` adds no
    parameter and keeps a spec's fingerprint as it was before the knob existed).

    ``per_layer`` knobs get a value for every compressible layer; the others one per trial.
    ``output_value`` (per-layer knobs) is forced for the layer producing the logits (a unit
    share of 1: every class stays); ``for_output_layer`` samples the knob for that layer even
    when it is excluded from compression (the logit-distillation temperature)."""

    name: str
    kind: str
    default: dict[str, Any]
    minimum: float | None = None
    maximum: float | None = None
    low_open: bool = False
    high_open: bool = False
    allowed_text: str = ""
    neutral: Any = NO_NEUTRAL
    per_layer: bool = True
    choices: tuple[int, ...] = VALID_BITS
    output_value: Any = None
    for_output_layer: bool = False
    help: str = ""

    def check_value(self, key: str, value: Any) -> float | int:
        """Return ``value`` if this knob accepts it, else raise :class:`SpecError`."""
        if self.kind == "int-choice":
            if isinstance(value, bool) or not isinstance(value, int) or value not in self.choices:
                raise SpecError(key, value, self.allowed_text)
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(key, value, self.allowed_text)
        value = float(value)
        too_low = self.minimum is not None and (value < self.minimum or (self.low_open and value == self.minimum))
        too_high = self.maximum is not None and (value > self.maximum or (self.high_open and value == self.maximum))
        if too_low or too_high:
            raise SpecError(key, value, self.allowed_text)
        return value

    @property
    def neutral_table(self) -> dict[str, Any] | None:
        """``{"fixed": neutral}``: the knob table that turns this knob off (``None``: no neutral)."""
        return None if self.neutral is NO_NEUTRAL else {"fixed": self.neutral}


@dataclass(frozen=True)
class Knob:
    """A parsed knob: a float range, a list of integer choices, or a fixed value.

    ``tie`` (per-layer knobs only) means one sampled value is shared by every layer.
    """

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[int, ...] | None = None
    fixed: float | int | None = None
    tie: bool = False

    @property
    def is_fixed(self) -> bool:
        return self.fixed is not None

    def describe(self) -> str:
        """A short human description, used in reports and errors."""
        if self.fixed is not None:
            text = f"fixed {self.fixed}"
        elif self.choices is not None:
            text = f"one of {list(self.choices)}"
        else:
            text = f"{'log-' if self.log else ''}float in [{self.low}, {self.high}]"
        return text + (" (tied across layers)" if self.tie else "")

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as it would be written in TOML (defaults filled in)."""
        out: dict[str, Any] = {}
        if self.fixed is not None:
            out["fixed"] = self.fixed
        elif self.choices is not None:
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, log=self.log)
        if self.tie:
            out["tie"] = True
        return out


def parse_knob(key: str, raw: Any, decl: KnobDeclaration) -> Knob:
    """Validate one knob table of a spec (``key`` is its dotted path, for messages)."""
    if raw is None:
        raw = dict(decl.default)
    elif not isinstance(raw, dict):
        raw = {"fixed": raw}  # a bare value is shorthand for ``fixed = value``
    name = key.rsplit(".", 1)[-1]
    allowed_keys = {"fixed", "tie"} if decl.per_layer else {"fixed"}
    allowed_keys |= {"choices"} if decl.kind == "int-choice" else {"low", "high", "log"}
    for k in raw:
        if k not in allowed_keys:
            raise SpecError(f"{key}.{k}", raw[k], f"keys {sorted(allowed_keys)}", "is not a known key")
    tie = raw.get("tie", False)
    if not isinstance(tie, bool):
        raise SpecError(f"{key}.tie", tie, "true or false")
    if "fixed" in raw:
        extra = [k for k in raw if k not in ("fixed", "tie")]
        if extra:
            raise SpecError(f"{key}.{extra[0]}", raw[extra[0]], "nothing else beside 'fixed'", "conflicts with 'fixed'")
        return Knob(name, fixed=decl.check_value(f"{key}.fixed", raw["fixed"]), tie=tie)
    if decl.kind == "int-choice":
        choices = raw.get("choices", decl.default.get("choices"))
        if not isinstance(choices, list) or not choices:
            raise SpecError(f"{key}.choices", choices, f"a non-empty list of {decl.allowed_text}")
        checked = tuple(sorted({decl.check_value(f"{key}.choices", c) for c in choices}))
        return Knob(name, choices=checked, tie=tie)
    low = decl.check_value(f"{key}.low", raw.get("low", decl.default.get("low")))
    high = decl.check_value(f"{key}.high", raw.get("high", decl.default.get("high")))
    if low > high:
        raise SpecError(f"{key}.low", low, f"a value no greater than high ({high})")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(f"{key}.log", log, "true or false")
    if log and low <= 0:
        raise SpecError(f"{key}.low", low, "a positive value when log = true")
    if low == high:
        return Knob(name, fixed=low, tie=tie)
    return Knob(name, low=low, high=high, log=log, tie=tie)


@dataclass(frozen=True)
class Panel:
    """How the report draws one per-layer value of the Pareto trials: from the ``plan`` (a knob)
    or from what the method ``achieved`` (its stats); ``only_if_used``: drawn only when some
    trial moved it off its neutral value."""

    title: str
    key: str
    source: str  # "plan" or "achieved"
    colorscale: str
    text_format: str
    hover: str
    low: float | None = None
    high: float | None = None
    log2: bool = False
    only_if_used: bool = False
    neutral: Any = None


@dataclass(frozen=True)
class Declaration:
    """What a method (or another part of a trial's recipe) declares, once: its knobs, its options
    (the ``[method.<name>]`` settings), the per-layer stats it reports, and the report panels
    that show them. ``compresses``: it changes the stored layers (pruning, quantization, ...),
    rather than how they are trained (distillation, losses)."""

    name: str
    help: str
    knobs: tuple[KnobDeclaration, ...] = ()
    options: tuple[Any, ...] = ()  # Settings (see ``_settings``) of section [method.<name>]
    stats: tuple[str, ...] = ()
    panels: tuple[Panel, ...] = ()
    compresses: bool = True
    moved: dict[str, str] = field(default_factory=dict)
