"""Named study definitions shipped with slimtune, as TOML files in ``presets/``.

Example:
    >>> "lenet300-mnist" in preset_names()
    True
    >>> load_preset("cnn-digits")["model"]
    {'preset': 'cnn-digits'}
"""

from __future__ import annotations

import importlib.resources
import tomllib
from typing import Any

from slimtune.spaces import SpecError


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    folder = importlib.resources.files("slimtune.studies").joinpath("presets")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset's TOML as plain data (validate it with ``slimtune.spaces.parse_spec``)."""
    names = preset_names()
    if name not in names:
        raise SpecError("--preset", name, ", ".join(names), "is not a known preset")
    text = importlib.resources.files("slimtune.studies").joinpath("presets", f"{name}.toml").read_text()
    return tomllib.loads(text)
