"""Settings declared once: type, range, default, neutral value and help of every spec key.

A :class:`Setting` says what one key of a spec section accepts; a :class:`Section` groups the
settings of one TOML table (``[finetune]``, ``[method.prune]``, ...). From these declarations
come the parser (:meth:`Section.parse`, which reports every bad key of the section at once), the
defaults, the fingerprint (a setting at its *neutral* value, or one that changes how a study runs
rather than what its trials mean, is left out of it) and the README's spec reference
(:func:`reference_toml`).

Example:
    >>> section = Section("teacher", "How the teacher is trained", (
    ...     Setting("epochs", int, 10, "epochs of training", low=1, high=10_000),))
    >>> errors = Errors()
    >>> section.parse({"epochs": 0}, errors), str(errors.errors[0])
    ({'epochs': 10}, 'teacher.epochs: 0 is not allowed; allowed: an integer in [1, 10000]')
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import SpecError

MISSING: Any = object()  # "no neutral value": the setting is always part of the fingerprint


class Errors:
    """Every :class:`SpecError` met while reading a spec, so that all are reported at once."""

    def __init__(self) -> None:
        self.errors: list[SpecError] = []

    def catch(self, check: Callable[[], Any], fallback: Any = None) -> Any:
        """``check()``, or ``fallback`` after recording the :class:`SpecError` it raised."""
        try:
            return check()
        except SpecError as exc:
            self.add(exc)
            return fallback

    def add(self, error: SpecError) -> None:
        for one in getattr(error, "errors", [error]):
            if str(one) not in {str(e) for e in self.errors}:
                self.errors.append(one)

    def raise_any(self) -> None:
        """Raise the one error, or a :class:`SpecError` listing them all; nothing if there is none."""
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise SpecErrors(self.errors)


class SpecErrors(SpecError):
    """Several spec errors at once; the message has one line per error.

    >>> print(SpecErrors([SpecError("a", 1, "2"), SpecError("b", 3, "4")]))
    2 problems in the spec:
      a: 1 is not allowed; allowed: 2
      b: 3 is not allowed; allowed: 4
    """

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = list(errors)
        first = errors[0]
        ValueError.__init__(self, f"{len(errors)} problems in the spec:\n" + "\n".join(f"  {e}" for e in errors))
        self.key, self.value, self.allowed = first.key, first.value, first.allowed


@dataclass(frozen=True)
class Setting:
    """One key of a section: ``kind`` is ``int``, ``float``, ``bool`` or ``str``; ``choices``
    limits it to a list, ``low``/``high`` to a range (``low_open``: low excluded). ``neutral``
    is the value with which the setting changes nothing a trial means (left out of the
    fingerprint; ``MISSING``: none); ``fingerprinted=False`` leaves it out always (it changes
    how a study runs, not what its trials mean)."""

    key: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()
    neutral: Any = MISSING
    fingerprinted: bool = True

    def allowed(self) -> str:
        """What the setting accepts, in words."""
        if self.choices:
            return ", ".join(f'"{c}"' if isinstance(c, str) else str(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "a string"
        word = "an integer" if self.kind is int else "a number"
        if self.low is None and self.high is None:
            return word
        return (f"{word} in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")

    def check(self, path: str, value: Any) -> Any:
        """``value`` as this setting holds it, or a :class:`SpecError` naming ``path``."""
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if ok and self.choices:
            ok = value in self.choices
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise SpecError(path, value, self.allowed())
        return value

    def is_neutral(self, value: Any) -> bool:
        return self.neutral is not MISSING and value == self.neutral


def _number(value: float | None) -> str:
    if value is None:
        return "inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else str(value)


@dataclass(frozen=True)
class Section:
    """The settings of one spec table, ``name`` dotted (``"method.prune"``)."""

    name: str
    help: str
    settings: tuple[Setting, ...]
    moved: Mapping[str, str] = field(default_factory=dict)  # old key -> where it lives now (for messages)

    def __post_init__(self) -> None:
        keys = [s.key for s in self.settings]
        if len(set(keys)) != len(keys):
            raise ValueError(f"section {self.name} declares a key twice: {keys}")

    def setting(self, key: str) -> Setting:
        return next(s for s in self.settings if s.key == key)

    def defaults(self) -> dict[str, Any]:
        return {s.key: s.default for s in self.settings}

    def parse(self, raw: Any, errors: Errors, allow: Iterable[str] = ()) -> dict[str, Any]:
        """The section's values: each given key checked, each missing key its default; every
        problem goes to ``errors`` (and the default stands in). Keys in ``allow`` are left to the caller."""
        values = self.defaults()
        if raw is None:
            return values
        if not isinstance(raw, Mapping):
            errors.add(SpecError(self.name, raw, f"a table with keys {sorted(values)}"))
            return values
        known = set(values) | set(allow)
        for key, value in raw.items():
            if key in known:
                if key in values:
                    values[key] = errors.catch(lambda: self.setting(key).check(f"{self.name}.{key}", value),
                                               values[key])
            elif key in self.moved:
                errors.add(SpecError(f"{self.name}.{key}", value, f"the key {self.moved[key]}",
                                     "has moved (since slimtune 0.2)"))
            else:
                errors.add(SpecError(f"{self.name}.{key}", value, f"keys {sorted(known)}", "is not a known key"))
        return values

    def fingerprint_part(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` without the settings that do not change what a trial means."""
        return {s.key: values[s.key] for s in self.settings
                if s.key in values and s.fingerprinted and not s.is_neutral(values[s.key])}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, float) and (abs(value) < 1e-3 or abs(value) >= 1e6) and value != 0:
        return f"{value:g}"
    return str(value)


def reference_toml(sections: Iterable[Section]) -> str:
    """The spec reference of ``sections``: each table with every key at its default and its
    help as a comment (what the README's spec reference shows).

    >>> print(reference_toml([Section("teacher", "how the teacher is trained", (
    ...     Setting("epochs", int, 10, "epochs of training", low=1, high=10_000),))]))
    [teacher]                         # how the teacher is trained
    epochs = 10                       # epochs of training; an integer in [1, 10000]
    """
    blocks = []
    for section in sections:
        lines = [_comment(f"[{section.name}]", section.help)]
        for setting in section.settings:
            lines.append(_comment(f"{setting.key} = {_toml(setting.default)}", f"{setting.help}; {setting.allowed()}"))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _comment(code: str, text: str, column: int = 34, width: int = 100) -> str:
    """``code`` then ``# text`` from ``column`` on, the text wrapped into ``#`` lines under it."""
    lines = textwrap.wrap(text, width - column - 2) or [""]
    head = f"{code:<{column - 1}} # {lines[0]}" if len(code) < column - 1 else f"{code}  # {lines[0]}"
    return "\n".join([head, *(f"{'':<{column - 1}} #   {line}" for line in lines[1:])])
