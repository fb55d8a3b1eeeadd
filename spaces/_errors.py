"""The one error type that bad user input raises, shared by every layer.

Example:
    >>> err = SpecError("space.weight_bits.choices", 33, "integers 2..16, or 32 (unquantized)")
    >>> print(err)
    space.weight_bits.choices: 33 is not allowed; allowed: integers 2..16, or 32 (unquantized)
"""

from __future__ import annotations

from typing import Any


class SpecError(ValueError):
    """A study spec (or command-line value) that cannot be used.

    The message names the key, the offending value and what is allowed, so a person can fix it
    without reading code. The CLI turns it into exit code 2 before anything is written.
    """

    def __init__(self, key: str, value: Any, allowed: str, problem: str = "is not allowed") -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key}: {value!r} {problem}; allowed: {allowed}")
