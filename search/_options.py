"""Command-line options shared by the ``slimtune`` subcommands (the storage URL, trusted modules,
checked numbers).

Example:
    >>> number_in(int, 1, 10, "an integer in 1..10")("3")
    3
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable

from slimtune.spaces import DEFAULT_STORAGE, TRUST_ENV

from ._env import STORAGE_ENV


def number_in(kind: type, low: float, high: float, allowed: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)`` within ``[low, high]``, else a message naming what
    is allowed (argparse then exits 2).

    Example:
        >>> number_in(int, 1, 10, "an integer in 1..10")("3")
        3
    """
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:  # NaN fails the comparison too
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: {allowed}")
        return value

    return parse


positive_int = number_in(int, 1, math.inf, "a positive integer")
seed_number = number_in(int, 0, 2**31 - 1, "an integer in [0, 2147483647]")
positive_seconds = number_in(float, 1e-9, math.inf, "a positive number of seconds")
drop_number = number_in(float, 0, math.inf, "a drop in the study's metric, >= 0 (0.005 = half a point of accuracy)")


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    """``--storage URL``, defaulting to ``$SLIMTUNE_STORAGE`` (which keeps a password off the
    command line), else ``sqlite:///slimtune.db``."""
    parser.add_argument("--storage", default=os.environ.get(STORAGE_ENV, DEFAULT_STORAGE),
                        help=f"SQLAlchemy URL (default: ${STORAGE_ENV}, else {DEFAULT_STORAGE})")


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    """``--trust MODULE`` (repeatable): let this command import code of MODULE named by data
    (a stored spec, an artifact); see ``slimtune.spaces.require_trusted``."""
    parser.add_argument("--trust", action="append", default=[], metavar="MODULE",
                        help=f"import the model factory or data module of MODULE (or a package holding it) even "
                        f"when a study database or a .slim file names it (also: ${TRUST_ENV}=MOD1,MOD2)")
