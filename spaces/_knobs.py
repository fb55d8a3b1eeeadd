"""Declarative knobs: one searched (or fixed, or tied) value of a compression plan.

A knob is written in a spec's ``[space]`` section as a small table, for example::

    [space.prune_ratio]   low = 0.0, high = 0.95          # searched per layer
    [space.weight_bits]   choices = [2, 4, 8], tie = true # one value shared by all layers
    [space.kd_alpha]      fixed = 0.7                     # not searched

Example:
    >>> knob = parse_knob("space.prune_ratio", {"low": 0.1, "high": 0.9}, PER_LAYER_KNOBS["prune_ratio"])
    >>> knob.describe()
    'float in [0.1, 0.9]'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ._errors import SpecError

VALID_BITS = tuple(range(2, 17)) + (32,)
BITS_ALLOWED = "integers 2..16, or 32 (unquantized)"


@dataclass(frozen=True)
class KnobRule:
    """What values a knob may take, and its default when the spec says nothing."""

    kind: str  # "float" or "int-choice"
    default: dict[str, Any]
    minimum: float | None = None
    maximum: float | None = None
    maximum_inclusive: bool = True
    minimum_inclusive: bool = True
    allowed_text: str = ""

    def check_value(self, key: str, value: Any) -> float | int:
        """Return ``value`` if this knob accepts it, else raise :class:`SpecError`."""
        if self.kind == "int-choice":
            if isinstance(value, bool) or not isinstance(value, int) or value not in VALID_BITS:
                raise SpecError(key, value, self.allowed_text)
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(key, value, self.allowed_text)
        value = float(value)
        too_low = self.minimum is not None and (
            value < self.minimum or (not self.minimum_inclusive and value == self.minimum)
        )
        too_high = self.maximum is not None and (
            value > self.maximum or (not self.maximum_inclusive and value == self.maximum)
        )
        if too_low or too_high:
            raise SpecError(key, value, self.allowed_text)
        return value


PER_LAYER_KNOBS: dict[str, KnobRule] = {
    "prune_ratio": KnobRule(
        "float", {"low": 0.0, "high": 0.95}, 0.0, 1.0, maximum_inclusive=False,
        allowed_text="a fraction in [0, 1): the share of a layer's weights set to zero",
    ),
    "weight_bits": KnobRule(
        "int-choice", {"choices": [2, 3, 4, 5, 6, 8, 32]}, allowed_text=BITS_ALLOWED,
    ),
    "kd_temperature": KnobRule(
        "float", {"low": 1.0, "high": 8.0}, 0.0, 100.0, minimum_inclusive=False,
        allowed_text="a temperature in (0, 100]",
    ),
    "rank_ratio": KnobRule(
        "float", {"fixed": 1.0}, 0.0, 1.0, minimum_inclusive=False,
        allowed_text="a fraction in (0, 1]: the share of a layer's rank kept by a truncated SVD (1 = not factorized)",
    ),
    "unit_ratio": KnobRule(
        "float", {"fixed": 1.0}, 0.0, 1.0, minimum_inclusive=False,
        allowed_text="a fraction in (0, 1]: the share of a layer's output units (neurons, channels) kept (1 = all)",
    ),
}

GLOBAL_KNOBS: dict[str, KnobRule] = {
    "kd_alpha": KnobRule(
        "float", {"low": 0.5, "high": 1.0}, 0.0, 1.0,
        allowed_text="a weight in [0, 1] of the logit-distillation loss against the label loss",
    ),
    "feature_kd_weight": KnobRule(
        "float", {"low": 0.0, "high": 1.0}, 0.0, 1000.0,
        allowed_text="a weight in [0, 1000] of the feature-distillation loss (0 turns it off)",
    ),
    "lr": KnobRule(
        "float", {"fixed": 1e-3}, 0.0, 1.0, minimum_inclusive=False,
        allowed_text="a learning rate in (0, 1]",
    ),
    "l1_weight": KnobRule(
        "float", {"fixed": 0.0}, 0.0, 1000.0,
        allowed_text="a weight in [0, 1000] of the L1 sparsity pressure on the compressed weights (0 turns it off)",
    ),
}

# Knobs added after the first release whose default turns them off. A spec that leaves them at
# that default fingerprints exactly as it did before they existed (see StudySpec.fingerprint),
# and, being fixed, they add no parameter to a study.
NEUTRAL_KNOBS: dict[str, dict[str, Any]] = {"rank_ratio": {"fixed": 1.0}, "l1_weight": {"fixed": 0.0},
                                             "unit_ratio": {"fixed": 1.0}}


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


def parse_knob(key: str, raw: Any, rule: KnobRule, per_layer: bool = True) -> Knob:
    """Validate one knob table of a spec (``key`` is its dotted path, for messages)."""
    if raw is None:
        raw = dict(rule.default)
    elif not isinstance(raw, dict):
        # A bare value is shorthand for ``fixed = value``.
        raw = {"fixed": raw}
    name = key.rsplit(".", 1)[-1]
    allowed_keys = {"fixed", "tie"} if per_layer else {"fixed"}
    allowed_keys |= {"choices"} if rule.kind == "int-choice" else {"low", "high", "log"}
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
        return Knob(name, fixed=rule.check_value(f"{key}.fixed", raw["fixed"]), tie=tie)
    if rule.kind == "int-choice":
        choices = raw.get("choices", rule.default.get("choices"))
        if not isinstance(choices, list) or not choices:
            raise SpecError(f"{key}.choices", choices, f"a non-empty list of {rule.allowed_text}")
        checked = tuple(sorted({rule.check_value(f"{key}.choices", c) for c in choices}))
        return Knob(name, choices=checked, tie=tie)
    low = rule.check_value(f"{key}.low", raw.get("low", rule.default.get("low")))
    high = rule.check_value(f"{key}.high", raw.get("high", rule.default.get("high")))
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
