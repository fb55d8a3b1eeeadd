"""Declarative search spaces: the study spec, its knobs, and sampling a trial into a plan.

No torch here: a spec can be validated and a plan read on a machine with only the database.

Example:
    >>> from slimtune.spaces import parse_spec
    >>> parse_spec({"study": {"name": "x"}, "model": {"preset": "lenet300"},
    ...             "data": {"preset": "mnist"}}).sampler
    'tpe'
"""

from __future__ import annotations

from ._errors import SpecError
from ._trust import TRUST_ENV, UntrustedReference, is_trusted, module_of, require_trusted, trust, trusted_modules, trusting
from ._knobs import BITS_ALLOWED, GLOBAL_KNOBS, PER_LAYER_KNOBS, VALID_BITS, Knob
from ._plan import CompressionPlan, LayerPlan, sample_plan, select_layers
from ._spec import (
    DATA_PRESETS,
    DEFAULT_STORAGE,
    MISSING_POLICIES,
    MODEL_PRESETS,
    SAMPLERS,
    SPLIT_VALUES,
    PRUNE_SCHEDULES,
    BIAS_BITS,
    QUANTIZERS,
    DataSpec,
    FinetuneSpec,
    ModelSpec,
    SpaceSpec,
    StudySpec,
    TrainSpec,
    load_spec_file,
    parse_data_section,
    parse_spec,
)

__all__ = [
    "BITS_ALLOWED", "DATA_PRESETS", "DEFAULT_STORAGE", "GLOBAL_KNOBS", "MODEL_PRESETS", "PER_LAYER_KNOBS",
    "SAMPLERS", "VALID_BITS", "CompressionPlan", "DataSpec", "FinetuneSpec", "Knob", "LayerPlan", "ModelSpec", "SpaceSpec",
    "SpecError", "StudySpec", "TrainSpec", "load_spec_file", "parse_data_section", "parse_spec", "sample_plan", "select_layers",
    "BIAS_BITS", "MISSING_POLICIES", "PRUNE_SCHEDULES", "QUANTIZERS", "SPLIT_VALUES",
    "TRUST_ENV", "UntrustedReference", "is_trusted", "module_of", "require_trusted", "trust", "trusted_modules", "trusting",
]
