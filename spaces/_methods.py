"""The methods a trial is made of, declared once: their knobs, options, stats and report panels.

Each :class:`~slimtune.spaces.Declaration` here is the plain-data side of one method; its tensor
side (how it changes a layer, its fine-tune callbacks, its share of the artifact) is the module
of the same name in ``slimtune.trainers.methods``. The spec parser, the sampler, parameter names,
Pareto columns and report panels iterate :func:`declarations`, so a method registered with
:func:`register_declaration` (``slimtune.trainers.register_method`` does it) is searched like
the built-in ones.

Order matters and is kept: knobs are sampled in declaration order (per-layer knobs first, then
the others), so a search with the same seed draws the same plans as before.

Example:
    >>> [d.name for d in declarations()]
    ['prune', 'quantize', 'distill', 'lowrank', 'units', 'recipe', 'loss']
    >>> [k.name for k in per_layer_knobs()]
    ['prune_ratio', 'weight_bits', 'act_bits', 'kd_temperature', 'rank_ratio', 'unit_ratio']
"""

from __future__ import annotations

from ._knobs import BITS_ALLOWED, Declaration, KnobDeclaration, Panel
from ._settings import Section, Setting

PRUNE_SCHEDULES = ("oneshot", "gradual", "dynamic")
QUANTIZERS = ("amax", "lsq")
BIAS_BITS = (32, 16)
ACT_BITS_CHOICES = (8, 32)

PRUNE = Declaration(
    "prune", "unstructured pruning: the smallest-scoring weights of a layer set to zero",
    knobs=(KnobDeclaration("prune_ratio", "float", {"low": 0.0, "high": 0.95}, 0.0, 1.0, high_open=True,
                           allowed_text="a fraction in [0, 1): the share of a layer's weights set to zero", neutral=0.0,
                           help="share of the layer's weights set to zero"),),
    options=(
        Setting("schedule", str, "oneshot", "when masks are chosen: oneshot (before the first step), gradual (sparsity "
                "grows 0 -> planned along a cubic ramp) or dynamic (planned sparsity from the start, masks re-chosen "
                "with straight-through gradients, then frozen)", choices=PRUNE_SCHEDULES, neutral="oneshot"),
        Setting("ramp", float, 0.5, "share of the fine-tune's steps over which gradual/dynamic masks move",
                low=0.0, high=1.0, low_open=True, neutral=0.5),
        Setting("activation_power", float, 0.5, "mask score |w| * rms(teacher input)^p: 0 = magnitude, 1 = Wanda",
                low=0.0, high=4.0, neutral=0.0),
    ),
    stats=("sparsity",),
    panels=(Panel("sparsity (achieved)", "sparsity", "achieved", "Blues", ".0%", "sparsity %{z:.1%}", 0.0, 1.0),),
)

QUANTIZE = Declaration(
    "quantize", "uniform symmetric per-output-channel weight quantization (integer codes and scales), and "
    "optionally the layer's input as int8 codes",
    knobs=(KnobDeclaration("weight_bits", "int-choice", {"choices": [2, 3, 4, 5, 6, 8, 32]}, allowed_text=BITS_ALLOWED,
                           neutral=32, help="bits per weight code (32: float, not quantized)"),
           KnobDeclaration("act_bits", "int-choice", {"fixed": 32}, choices=ACT_BITS_CHOICES,
                           allowed_text="8 (the layer's input as int8 codes: integer kernels in the ONNX export) or "
                                        "32 (float)", neutral=32,
                           help="bits of the layer's input (8: int8 codes, a range observed in training; 32: float)")),
    options=(
        Setting("quantizer", str, "lsq", "how channel scales are chosen: amax (largest weight / largest code) or lsq "
                "(learned step sizes)", choices=QUANTIZERS, neutral="amax"),
        Setting("bias_bits", int, 16, "the compressed layers' biases: 32 (float32) or 16 (trained and stored as "
                "float16)", choices=BIAS_BITS, neutral=32),
    ),
    stats=("bits",),
    panels=(Panel("weight bits (achieved)", "bits", "achieved", "Viridis", "d", "bits %{text}", 1.0, 5.0, log2=True),
            Panel("input bits (plan act_bits)", "act_bits", "plan", "Cividis", "d", "input bits %{z}", 8.0, 32.0,
                  only_if_used=True, neutral=32)),
)

DISTILL = Declaration(
    "distill", "knowledge distillation from the teacher: logits, and hidden features of the compressed layers",
    knobs=(
        KnobDeclaration("kd_temperature", "float", {"low": 1.0, "high": 8.0}, 0.0, 100.0, low_open=True,
                        allowed_text="a temperature in (0, 100]", for_output_layer=True,
                        help="distillation temperature of the layer's output (the output layer's: the logits')"),
        KnobDeclaration("kd_alpha", "float", {"low": 0.5, "high": 1.0}, 0.0, 1.0, per_layer=False,
                        allowed_text="a weight in [0, 1] of the logit-distillation loss against the label loss",
                        help="weight of the logit-distillation loss against the label loss"),
        KnobDeclaration("feature_kd_weight", "float", {"low": 0.0, "high": 1.0}, 0.0, 1000.0, per_layer=False,
                        allowed_text="a weight in [0, 1000] of the feature-distillation loss (0 turns it off)",
                        neutral=0.0, help="weight of the feature-distillation loss (0: off)"),
    ),
    panels=(Panel("KD temperature (plan)", "kd_temperature", "plan", "Oranges", ".1f", "T = %{z:.2f}"),),
    compresses=False,
)

LOWRANK = Declaration(
    "lowrank", "low-rank factorization: a layer replaced by the two factors of a truncated SVD",
    knobs=(KnobDeclaration("rank_ratio", "float", {"fixed": 1.0}, 0.0, 1.0, low_open=True,
                           allowed_text="a fraction in (0, 1]: the share of a layer's rank kept by a truncated SVD "
                                        "(1 = not factorized)", neutral=1.0,
                           help="share of the layer's rank kept, max(1, round(r * min(out, in*kh*kw))); 1: whole"),),
    stats=("rank",),
    panels=(Panel("rank kept (plan rank_ratio)", "rank_ratio", "plan", "Greens", ".2f", "rank ratio %{z:.2f}", 0.0,
                  1.0, only_if_used=True, neutral=1.0),),
)

UNITS = Declaration(
    "units", "structured pruning: a share of a layer's output units (neurons, channels) kept, the rest removed",
    knobs=(KnobDeclaration("unit_ratio", "float", {"low": 0.3, "high": 1.0}, 0.0, 1.0, low_open=True,
                           allowed_text="a fraction in (0, 1]: the share of a layer's output units (neurons, channels) "
                                        "kept (1 = all)", neutral=1.0, output_value=1.0,
                           help="share of the layer's output units kept (1: all; the logits keep every class)"),),
    stats=("units",),
    panels=(Panel("units kept (plan unit_ratio)", "unit_ratio", "plan", "Purples", ".2f", "unit ratio %{z:.2f}", 0.0,
                  1.0, only_if_used=True, neutral=1.0),),
)

RECIPE = Declaration(
    "recipe", "the fine-tune's optimizer",
    knobs=(KnobDeclaration("lr", "float", {"fixed": 1e-3}, 0.0, 1.0, low_open=True, per_layer=False,
                           allowed_text="a learning rate in (0, 1]", help="fine-tune learning rate (Adam)"),),
    compresses=False,
)

LOSS = Declaration(
    "loss", "extra loss terms on the compressed layers' weights (as the forward pass uses them)",
    knobs=(
        KnobDeclaration("l1_weight", "float", {"fixed": 0.0}, 0.0, 1000.0, per_layer=False, neutral=0.0,
                        allowed_text="a weight in [0, 1000] of the L1 sparsity pressure on the compressed weights "
                                     "(0 turns it off)", help="adds l1_weight * sum over layers of mean |w| (0: off)"),
        KnobDeclaration("l2_weight", "float", {"fixed": 0.0}, 0.0, 1000.0, per_layer=False, neutral=0.0,
                        allowed_text="a weight in [0, 1000] of the L2 pressure on the compressed weights "
                                     "(0 turns it off)", help="adds l2_weight * sum over layers of mean w^2 (0: off)"),
    ),
    compresses=False,
)

_DECLARATIONS: dict[str, Declaration] = {d.name: d for d in (PRUNE, QUANTIZE, DISTILL, LOWRANK, UNITS, RECIPE, LOSS)}


def register_declaration(declaration: Declaration) -> None:
    """Add a method's declaration (its knobs are searched after the built-in ones). Registering
    the same declaration again is a no-op; another one under a taken name, or a knob name that
    another method declares, is a ``ValueError``."""
    taken = _DECLARATIONS.get(declaration.name)
    if taken is not None:
        if taken == declaration:
            return
        raise ValueError(f"a method named {declaration.name!r} is already registered")
    names = {k.name for d in _DECLARATIONS.values() for k in d.knobs}
    clash = [k.name for k in declaration.knobs if k.name in names]
    if clash:
        raise ValueError(f"knob {clash[0]!r} of method {declaration.name!r} is declared by another method")
    if not declaration.name.isidentifier():
        raise ValueError(f"a method name is an identifier, not {declaration.name!r}")
    _DECLARATIONS[declaration.name] = declaration


def unregister_declaration(name: str) -> None:
    """Remove a method registered with :func:`register_declaration` (built-ins stay)."""
    if name in BUILT_IN:
        raise ValueError(f"{name!r} is built in")
    _DECLARATIONS.pop(name, None)


BUILT_IN = tuple(_DECLARATIONS)


def declarations() -> list[Declaration]:
    """Every registered declaration, in order."""
    return list(_DECLARATIONS.values())


def declaration(name: str) -> Declaration:
    return _DECLARATIONS[name]


def knob_declarations() -> dict[str, KnobDeclaration]:
    """Every knob by name: per-layer knobs first (declaration order), then the others."""
    knobs = [k for d in _DECLARATIONS.values() for k in d.knobs]
    return {k.name: k for k in [*(k for k in knobs if k.per_layer), *(k for k in knobs if not k.per_layer)]}


def per_layer_knobs() -> list[KnobDeclaration]:
    return [k for k in knob_declarations().values() if k.per_layer]


def global_knobs() -> list[KnobDeclaration]:
    return [k for k in knob_declarations().values() if not k.per_layer]


def method_sections() -> list[Section]:
    """The ``[method.<name>]`` sections of the declarations that have options."""
    return [Section(f"method.{d.name}", d.help, tuple(d.options), moved=d.moved) for d in _DECLARATIONS.values()
            if d.options]
