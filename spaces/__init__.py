"""Declarative search spaces: the study spec, the methods' declarations, sampling a trial into a plan.

No torch here: a spec can be validated and a plan read on a machine with only the database.

Example:
    >>> from slimtune.spaces import parse_spec
    >>> parse_spec({"study": {"name": "x"}, "model": {"preset": "lenet300"},
    ...             "data": {"preset": "mnist"}}).search.sampler
    'tpe'
"""

from __future__ import annotations

from ._errors import SpecError
from ._knobs import BITS_ALLOWED, NO_NEUTRAL, VALID_BITS, Declaration, Knob, KnobDeclaration, Panel, parse_knob
from ._methods import DISTILL as DISTILL_DECLARATION
from ._methods import LOSS as LOSS_DECLARATION
from ._methods import LOWRANK as LOWRANK_DECLARATION
from ._methods import PRUNE as PRUNE_DECLARATION
from ._methods import QUANTIZE as QUANTIZE_DECLARATION
from ._methods import RECIPE as RECIPE_DECLARATION
from ._methods import UNITS as UNITS_DECLARATION
from ._methods import (
    BIAS_BITS,
    BUILT_IN,
    PRUNE_SCHEDULES,
    QUANTIZERS,
    declaration,
    declarations,
    global_knobs,
    knob_declarations,
    method_sections,
    per_layer_knobs,
    register_declaration,
    unregister_declaration,
)
from ._metrics import DEFAULT_METRIC, METRICS, Metric, logged_metric, metric, metric_of
from ._plan import CompressionPlan, LayerPlan, knob_names, sample_plan, select_layers, unsampled_values
from ._seeds import calibration, estimated_drop, seed_params, sensitivity_grid, uniform_params
from ._settings import MISSING, Errors, Section, Setting, SpecErrors, reference_toml
from ._spec import (
    AUGMENT_STAGES,
    DATA_PRESETS,
    DEFAULT_STORAGE,
    MISSING_POLICIES,
    MODEL_PRESETS,
    SAMPLERS,
    SPLIT_VALUES,
    DataSpec,
    ModelSpec,
    SpaceSpec,
    StudySpec,
    Values,
    is_v01_spec,
    load_spec_file,
    parse_data_section,
    parse_spec,
    regular_sections,
    spec_reference,
    upgrade_stored_spec,
)
from ._trust import (
    TRUST_ENV,
    UntrustedReference,
    is_trusted,
    module_of,
    require_trusted,
    trust,
    trusted_modules,
    trusting,
)

__all__ = [
    "AUGMENT_STAGES", "BIAS_BITS", "BITS_ALLOWED", "BUILT_IN", "CompressionPlan", "DATA_PRESETS", "DEFAULT_METRIC",
    "DEFAULT_STORAGE", "DISTILL_DECLARATION", "DataSpec", "Declaration", "Errors", "Knob", "KnobDeclaration",
    "LOSS_DECLARATION", "LOWRANK_DECLARATION", "LayerPlan", "METRICS", "MISSING", "MISSING_POLICIES", "MODEL_PRESETS",
    "Metric", "ModelSpec", "NO_NEUTRAL", "PRUNE_DECLARATION", "PRUNE_SCHEDULES", "Panel", "QUANTIZERS",
    "QUANTIZE_DECLARATION", "RECIPE_DECLARATION", "SAMPLERS", "SPLIT_VALUES", "Section", "Setting", "SpaceSpec",
    "SpecError", "SpecErrors", "StudySpec", "TRUST_ENV", "UNITS_DECLARATION", "UntrustedReference", "VALID_BITS",
    "Values", "calibration", "declaration", "declarations", "estimated_drop", "global_knobs", "is_trusted",
    "is_v01_spec", "knob_declarations", "knob_names", "load_spec_file", "logged_metric", "method_sections", "metric",
    "metric_of", "module_of", "parse_data_section", "parse_knob", "parse_spec", "per_layer_knobs", "reference_toml",
    "register_declaration", "regular_sections", "require_trusted", "sample_plan", "seed_params", "select_layers",
    "sensitivity_grid", "spec_reference", "trust", "trusted_modules", "trusting", "uniform_params",
    "unregister_declaration", "unsampled_values", "upgrade_stored_spec",
]
