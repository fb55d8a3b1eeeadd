"""The study spec: one validated description of a compression search.

A spec comes from a TOML file or a named preset and is checked completely before anything is
written. It is stored in the study (user attrs), so ``slimtune resume`` needs only the study name
and the storage URL. Its :meth:`StudySpec.fingerprint` covers everything that changes what a
trial means (model, data, teacher, space, fine-tune, seed, sampler, floor) and leaves out what
does not (study name, storage URL, trial count, heartbeat settings).

Example:
    >>> spec = parse_spec({"study": {"name": "demo"}, "model": {"preset": "cnn-digits"},
    ...                    "data": {"preset": "digits"}})
    >>> spec.storage, spec.sampler, spec.space.knobs["weight_bits"].choices
    ('sqlite:///slimtune.db', 'tpe', (2, 3, 4, 5, 6, 8, 32))
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import SpecError
from ._knobs import GLOBAL_KNOBS, NEUTRAL_KNOBS, PER_LAYER_KNOBS, Knob, parse_knob

DEFAULT_STORAGE = "sqlite:///slimtune.db"
SAMPLERS = ("tpe", "nsga2", "random")
MODEL_PRESETS = ("lenet300", "lenet5", "cnn-digits", "mlp")
DATA_PRESETS = ("mnist", "digits", "breast-cancer")
TABLE_SUFFIXES = (".csv", ".parquet")
MISSING_POLICIES = ("refuse", "drop", "impute")
SPLIT_VALUES = ("train", "val", "test")
# [data] keys that only a table takes, with their defaults (None: no default).
TABLE_KEYS: dict[str, Any] = {"target": None, "categorical": [], "missing": "refuse", "split_column": None,
                              "val_fraction": 0.2, "test_fraction": 0.2, "split_seed": 0, "batch_size": 64}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_REF_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# "user:password@" in something that looks like a URL, masked before it is shown.
_PASSWORD_RE = re.compile(r"([^:/@\s]+:)[^@\s]*@")
# Study keys that change how a study runs, not what its trials mean.
_NOT_FINGERPRINTED = ("name", "storage", "trials", "heartbeat_interval", "heartbeat_grace")


@dataclass(frozen=True)
class ModelSpec:
    """Which network to compress: a preset name, or ``package.module:factory`` plus kwargs."""

    preset: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    # Where ``factory`` was read: None for the user's own input (imported), else the data that
    # named it (imported only if trusted; see ``slimtune.spaces.require_trusted``).
    source: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class DataSpec:
    """Which data: a preset name, ``package.module:DataModuleClass`` plus kwargs, or a table.

    A table is a CSV or Parquet file (``table``) with a label column (``target``); the other
    fields say how it is prepared and split (see ``slimtune.trainers.TableDataModule``). They
    are ``None`` unless ``table`` is set.
    """

    preset: str | None = None
    module: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    table: str | None = None
    target: str | None = None
    categorical: tuple[str, ...] | None = None
    missing: str | None = None
    split_column: str | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    split_seed: int | None = None
    batch_size: int | None = None
    source: str | None = field(default=None, compare=False)  # where ``module`` was read (see ModelSpec)

    def __post_init__(self) -> None:
        if self.categorical is not None and not isinstance(self.categorical, tuple):
            object.__setattr__(self, "categorical", tuple(self.categorical))  # from JSON: a list

    def table_options(self) -> dict[str, Any]:
        """The table keys as plain data (empty unless a table): the normalized ``[data]`` section."""
        if self.table is None:
            return {}
        names = ["table", *TABLE_KEYS]
        return {k: (list(v) if k == "categorical" else v) for k in names if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class TrainSpec:
    """How to train: ``epochs``, ``lr`` (teacher only: the student's lr is a knob), batch size, and
    ``augment_shift``: 0, or k (1 to 8) to train on images moved by a random offset of up to k
    pixels each way (see :class:`FinetuneSpec` for the student's use of it)."""

    epochs: int
    batch_size: int
    lr: float = 1e-3
    augment_shift: int = 0


PRUNE_SCHEDULES = ("oneshot", "gradual", "dynamic")
QUANTIZERS = ("amax", "lsq")
BIAS_BITS = (32, 16)
AUGMENT_STAGES = ("all", "refine")
# Fine-tune settings whose default leaves a trial as it was before they existed: a spec at these
# values keeps its old fingerprint (stored studies stay resumable).
NEUTRAL_FINETUNE: dict[str, Any] = {"prune_schedule": "oneshot", "prune_ramp": 0.5, "promote_epochs": 0,
                                    "promote_margin": 0.002, "promote_size_tolerance": 1.0, "quantizer": "amax",
                                    "prune_activation_power": 0.0, "bias_bits": 32, "refine_epochs": 0,
                                    "refine_top": 4, "refine_within": 0.002, "refine_share": 0.25,
                                    "weight_ema": 0.0, "augment_shift": 0, "augment_in": "all"}


@dataclass(frozen=True)
class FinetuneSpec(TrainSpec):
    """The student's fine-tune: ``epochs`` for every trial, plus the method settings:

    - ``prune_schedule``: ``"oneshot"`` applies each layer's pruning mask before the first
      step; ``"gradual"`` raises the sparsity from 0 to the planned ratio along a cubic ramp
      (Zhu & Gupta, 2017) over the first ``prune_ramp`` share of the ``epochs``' steps,
      recomputing the magnitude masks as the weights move; ``"dynamic"`` keeps the planned
      ratio from the start but re-chooses the masks by magnitude, with straight-through
      gradients so pruned weights can grow back (network surgery, Guo et al. 2016), during the
      first ``prune_ramp`` share of the ``epochs``' steps, then freezes them.
    - ``prune_activation_power`` p: which weights a mask keeps. A weight's score is
      ``|w| * rms(x) ** p``, ``rms(x)`` being the teacher's root-mean-square input to that
      weight (input feature, or input channel of a convolution) on the training data. 0 is
      plain magnitude pruning; 1 is Wanda's score (Sun et al., 2023). With p > 0 a layer
      keeps fewer weights on inputs that are nearly always zero (MNIST's border pixels).
    - ``bias_bits``: 32 keeps the compressed layers' biases in float32; 16 trains and stores
      them as float16 values (2 bytes each in the artifact).
    - ``promote_epochs``: a multi-fidelity rule of slimtune's own (Optuna cannot prune
      multi-objective studies). After ``epochs``, a trial whose (validation accuracy, packed
      size) is not beaten by a completed trial of the study (one at most as large and more
      than ``promote_margin`` more accurate) trains ``promote_epochs`` more epochs, its
      learning rate decaying to 0 along a cosine; the others stop there. With
      ``promote_size_tolerance`` t > 1, a completed trial up to t times as large counts as a
      competitor too (fewer trials promoted).
    - ``quantizer``: ``"amax"`` scales each channel by its largest weight; ``"lsq"`` learns
      each channel's step size during the fine-tune (Esser et al., 2020).
    - ``refine_epochs``: a refinement stage at the end of a search run (0: none). Up to
      ``refine_top`` feasible plans on the search's own Pareto front (refinements left out)
      whose validation accuracy is within
      ``refine_within`` of the teacher's (the smallest first) are trained again as new trials,
      with a fresh seed, for ``epochs`` plus ``refine_epochs`` more with a cosine decay. A
      refined plan is then judged by its refinement only: the trial it came from leaves the
      Pareto front. With a timeout, the search stops at ``1 - refine_share`` of it and the
      stage gets the rest.
    - ``weight_ema``: 0 (off) or the decay, in (0, 1), of an exponential moving average of the
      student's weights over the training steps; the trial packs the averaged weights.
    - ``augment_shift``: 0 (off) or k, 1 to 8: the student trains on its images moved by a
      random offset of up to k pixels each way (zero fill), with the original image's label
      and teacher logits as targets (the feature-KD term is left out of such a fine-tune).
      It needs image data (batches shaped N, C, H, W). ``augment_in`` says which fine-tunes
      shift: ``"all"`` (every trial) or ``"refine"`` (only the refinement stage's long runs;
      shifted images pay off over many epochs and cost accuracy over two).
    """

    prune_schedule: str = "oneshot"
    prune_ramp: float = 0.5
    promote_epochs: int = 0
    promote_margin: float = 0.002
    promote_size_tolerance: float = 1.0
    quantizer: str = "amax"
    prune_activation_power: float = 0.0
    bias_bits: int = 32
    refine_epochs: int = 0
    refine_top: int = 4
    refine_within: float = 0.002
    refine_share: float = 0.25
    weight_ema: float = 0.0
    augment_in: str = "all"


@dataclass(frozen=True)
class SpaceSpec:
    """Which layers are compressible and how every knob is searched.

    ``layers``/``exclude`` are shell-style name patterns (``fnmatch``) over the names of the
    model's ``Linear`` and ``Conv2d`` modules. ``overrides`` fixes knobs for the layers that a
    pattern matches, e.g. ``{"fc3": {"weight_bits": 8}}``.
    """

    layers: tuple[str, ...]
    exclude: tuple[str, ...]
    knobs: dict[str, Knob]
    overrides: dict[str, dict[str, float | int]]


@dataclass(frozen=True)
class StudySpec:
    """A complete, validated study definition."""

    name: str
    storage: str
    trials: int
    seed: int
    sampler: str
    max_accuracy_drop: float
    model: ModelSpec
    data: DataSpec
    teacher: TrainSpec
    finetune: FinetuneSpec
    space: SpaceSpec
    cache_mb: int
    heartbeat_interval: int
    heartbeat_grace: int
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    feasible_drop: float | None = None  # see parse_spec: val accuracy constraint, None = none
    source: str | None = field(default=None, compare=False)  # None: the user's own spec (see ModelSpec)

    def to_dict(self) -> dict[str, Any]:
        """The normalized spec (defaults filled in) as plain data; ``parse_spec`` reads it back."""
        return json.loads(json.dumps(self.raw))

    def fingerprint(self) -> str:
        """A short hash of everything that changes what a trial means."""
        body = {k: v for k, v in self.raw.items() if k != "study"}
        body["study"] = {k: v for k, v in self.raw["study"].items() if k not in _NOT_FINGERPRINTED}
        # Knobs left at their neutral default do not change what a trial means: a spec written
        # before they existed keeps its fingerprint (and its stored studies stay resumable).
        body["space"] = {k: v for k, v in body["space"].items() if not (k in NEUTRAL_KNOBS and v == NEUTRAL_KNOBS[k])}
        # The refinement stage adds trials but changes none: a study can gain one when resumed.
        body["finetune"] = {k: v for k, v in body["finetune"].items()
                            if not (k in NEUTRAL_FINETUNE and v == NEUTRAL_FINETUNE[k]) and not k.startswith("refine_")}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_overrides(self, **changes: Any) -> StudySpec:
        """A copy with study-level values replaced (``name``, ``storage``, ``trials``, ``seed``)."""
        raw = self.to_dict()
        for key, value in changes.items():
            if value is not None:
                raw["study"][key] = value
        return parse_spec(raw, source=self.source)


def load_spec_file(path: str | Path) -> StudySpec:
    """Read and validate a TOML spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("spec", str(path), "a path to an existing TOML file", "does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError("spec", str(path), f"valid TOML ({exc})", "cannot be parsed") from None
    return parse_spec(data)


def _table(raw: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise SpecError(key, value, f"a table with keys {sorted(allowed)}")
    for k in value:
        if k not in allowed:
            raise SpecError(f"{key}.{k}", value[k], f"keys {sorted(allowed)}", "is not a known key")
    return value


def _int(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(key, value, f"an integer in [{low}, {high}]")
    return value


def _float(key: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        raise SpecError(key, value, f"a number in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _patterns(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SpecError(key, value, "a list of layer-name patterns such as [\"fc*\", \"conv1\"]")
    return tuple(value)


def _ref(key: str, value: Any, what: str) -> str:
    if not isinstance(value, str) or not _REF_RE.match(value):
        raise SpecError(key, value, f"'package.module:{what}'")
    return value


def _kwargs(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(key, value, "a table of keyword arguments")
    return dict(value)


def _data_spec(raw: dict[str, Any], source: str | None) -> DataSpec:
    """The ``[data]`` section: exactly one of ``preset``, ``module`` or ``table`` (with its keys).

    Only the keys are checked here; the table file itself is read (and its columns checked) by
    ``slimtune.trainers`` before anything is written.
    """
    sources = [k for k in ("preset", "module", "table") if k in raw]
    if len(sources) != 1:
        raise SpecError("data", raw, "exactly one of 'preset', 'module' or 'table'")
    if "table" not in raw:
        for k in TABLE_KEYS:
            if k in raw:
                raise SpecError(f"data.{k}", raw[k], "keys ['kwargs', 'module', 'preset'] (or 'table' with its keys)",
                                "is a table option and needs data.table")
        if "preset" in raw and raw["preset"] not in DATA_PRESETS:
            raise SpecError("data.preset", raw["preset"], ", ".join(DATA_PRESETS))
        return DataSpec(
            preset=raw.get("preset"),
            module=_ref("data.module", raw["module"], "DataModuleClass") if "module" in raw else None,
            kwargs=_kwargs("data.kwargs", raw.get("kwargs", {})),
            source=source,
        )
    if "kwargs" in raw:
        raise SpecError("data.kwargs", raw["kwargs"], f"the table keys {sorted(TABLE_KEYS)}",
                        "is not a key of a table (it belongs to data.preset or data.module)")
    table = raw["table"]
    if not isinstance(table, str) or not table.lower().endswith(TABLE_SUFFIXES):
        raise SpecError("data.table", table, "a path to a .csv or .parquet file (relative to the working directory)")
    target = raw.get("target")
    if not isinstance(target, str) or not target:
        raise SpecError("data.target", target, "the name of the table's label column",
                        "is missing" if target is None else "is not allowed")
    categorical = raw.get("categorical", [])
    if (not isinstance(categorical, list) or not all(isinstance(c, str) and c for c in categorical)
            or len(set(categorical)) != len(categorical)):
        raise SpecError("data.categorical", categorical, "a list of distinct column names, e.g. [\"color\", \"city\"]")
    if target in categorical:
        raise SpecError("data.categorical", target, "feature columns only (the target is always read as classes)",
                        "is the target")
    missing = raw.get("missing", TABLE_KEYS["missing"])
    if missing not in MISSING_POLICIES:
        raise SpecError("data.missing", missing, ", ".join(f'"{m}"' for m in MISSING_POLICIES))
    split_column = raw.get("split_column")
    val_fraction: float | None = None
    test_fraction: float | None = None
    split_seed: int | None = None
    if split_column is not None:
        if not isinstance(split_column, str) or not split_column:
            raise SpecError("data.split_column", split_column, f"the name of a column holding {'/'.join(SPLIT_VALUES)}")
        if split_column == target or split_column in categorical:
            raise SpecError("data.split_column", split_column, "a column that is neither the target nor a feature")
        for k in ("val_fraction", "test_fraction", "split_seed"):
            if k in raw:
                raise SpecError(f"data.{k}", raw[k], "nothing when data.split_column is set (the column is the split)",
                                "conflicts with split_column")
    else:
        val_fraction = _float("data.val_fraction", raw.get("val_fraction", TABLE_KEYS["val_fraction"]), 0.0, 1.0,
                              low_open=True)
        test_fraction = _float("data.test_fraction", raw.get("test_fraction", TABLE_KEYS["test_fraction"]), 0.0, 1.0,
                               low_open=True)
        if val_fraction + test_fraction >= 1:
            raise SpecError("data.test_fraction", test_fraction, "a share leaving rows to train: val_fraction + "
                            f"test_fraction < 1 (val_fraction is {val_fraction})")
        split_seed = _int("data.split_seed", raw.get("split_seed", TABLE_KEYS["split_seed"]), 0, 2**31 - 1)
    return DataSpec(
        table=table, target=target, categorical=tuple(categorical), missing=missing, split_column=split_column,
        val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed,
        batch_size=_int("data.batch_size", raw.get("batch_size", TABLE_KEYS["batch_size"]), 1, 1_000_000),
    )


_DATA_KEYS = {"preset", "module", "kwargs", "table"} | set(TABLE_KEYS)


def parse_data_section(raw: Any, source: str | None = None) -> DataSpec:
    """A ``[data]`` section alone (as an artifact's meta holds it), validated as in a spec.

    >>> parse_data_section({"preset": "digits"}).preset
    'digits'
    """
    return _data_spec(_table({"data": raw}, "data", _DATA_KEYS), source)


def parse_spec(data: dict[str, Any], source: str | None = None) -> StudySpec:
    """Validate a spec given as plain data (parsed TOML) and fill in defaults.

    ``source`` says where the data was read when it is not the user's own input (the spec stored
    in a study): its model factory and data module are then imported only if trusted.
    """
    if not isinstance(data, dict):
        raise SpecError("spec", data, "a table")
    top = {"study", "model", "data", "teacher", "finetune", "space"}
    for k in data:
        if k not in top:
            raise SpecError(k, data[k], f"sections {sorted(top)}", "is not a known section")

    study = _table(data, "study", {"name", "storage", "trials", "seed", "sampler", "max_accuracy_drop",
                                   "feasible_drop", "heartbeat_interval", "heartbeat_grace"})
    name = study.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpecError("study.name", name, "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    storage = study.get("storage", DEFAULT_STORAGE)
    if not isinstance(storage, str) or "://" not in storage:
        shown = _PASSWORD_RE.sub(r"\1***@", storage) if isinstance(storage, str) else storage
        raise SpecError("study.storage", shown, "a SQLAlchemy URL such as sqlite:///slimtune.db or "
                        "postgresql+psycopg://user:password@host/db")
    trials = _int("study.trials", study.get("trials", 20), 1, 1_000_000)
    seed = _int("study.seed", study.get("seed", 0), 0, 2**31 - 1)
    sampler = study.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise SpecError("study.sampler", sampler, ", ".join(SAMPLERS))
    drop = _float("study.max_accuracy_drop", study.get("max_accuracy_drop", 0.05), 0.0, 1.0)
    feasible_drop = (None if study.get("feasible_drop") is None
                     else _float("study.feasible_drop", study["feasible_drop"], 0.0, 1.0))
    heartbeat_interval = _int("study.heartbeat_interval", study.get("heartbeat_interval", 20), 1, 3600)
    heartbeat_grace = _int("study.heartbeat_grace", study.get("heartbeat_grace", 60), 2, 86400)
    if heartbeat_grace <= heartbeat_interval:
        raise SpecError("study.heartbeat_grace", heartbeat_grace,
                        f"more seconds than heartbeat_interval ({heartbeat_interval})")

    model_raw = _table(data, "model", {"preset", "factory", "kwargs", "checkpoint"})
    if ("preset" in model_raw) == ("factory" in model_raw):
        raise SpecError("model", model_raw, "exactly one of 'preset' or 'factory'")
    if "preset" in model_raw and model_raw["preset"] not in MODEL_PRESETS:
        raise SpecError("model.preset", model_raw["preset"], ", ".join(MODEL_PRESETS))
    checkpoint = model_raw.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise SpecError("model.checkpoint", checkpoint, "a path to a state_dict saved with torch.save")
    model = ModelSpec(
        preset=model_raw.get("preset"),
        factory=_ref("model.factory", model_raw["factory"], "factory") if "factory" in model_raw else None,
        kwargs=_kwargs("model.kwargs", model_raw.get("kwargs", {})),
        checkpoint=checkpoint,
        source=source,
    )

    data_spec = _data_spec(_table(data, "data", _DATA_KEYS), source)

    teacher_raw = _table(data, "teacher", {"epochs", "lr", "batch_size", "augment_shift"})
    teacher = TrainSpec(
        epochs=_int("teacher.epochs", teacher_raw.get("epochs", 10), 1, 10_000),
        batch_size=_int("teacher.batch_size", teacher_raw.get("batch_size", 128), 1, 1_000_000),
        lr=_float("teacher.lr", teacher_raw.get("lr", 1e-3), 0.0, 1.0, low_open=True),
        augment_shift=_int("teacher.augment_shift", teacher_raw.get("augment_shift", 0), 0, 8),
    )
    finetune_raw = _table(data, "finetune", {"epochs", "batch_size", "cache_mb", *NEUTRAL_FINETUNE})
    schedule = finetune_raw.get("prune_schedule", NEUTRAL_FINETUNE["prune_schedule"])
    if schedule not in PRUNE_SCHEDULES:
        raise SpecError("finetune.prune_schedule", schedule, ", ".join(PRUNE_SCHEDULES))
    quantizer = finetune_raw.get("quantizer", NEUTRAL_FINETUNE["quantizer"])
    if quantizer not in QUANTIZERS:
        raise SpecError("finetune.quantizer", quantizer, ", ".join(QUANTIZERS))
    bias_bits = finetune_raw.get("bias_bits", NEUTRAL_FINETUNE["bias_bits"])
    if isinstance(bias_bits, bool) or bias_bits not in BIAS_BITS:
        raise SpecError("finetune.bias_bits", bias_bits, " or ".join(map(str, BIAS_BITS)))
    augment_in = finetune_raw.get("augment_in", NEUTRAL_FINETUNE["augment_in"])
    if augment_in not in AUGMENT_STAGES:
        raise SpecError("finetune.augment_in", augment_in, ", ".join(AUGMENT_STAGES))
    finetune = FinetuneSpec(
        quantizer=quantizer,
        bias_bits=int(bias_bits),
        epochs=_int("finetune.epochs", finetune_raw.get("epochs", 2), 1, 10_000),
        batch_size=_int("finetune.batch_size", finetune_raw.get("batch_size", 128), 1, 1_000_000),
        prune_schedule=schedule,
        prune_ramp=_float("finetune.prune_ramp", finetune_raw.get("prune_ramp", NEUTRAL_FINETUNE["prune_ramp"]),
                          0.0, 1.0, low_open=True),
        promote_epochs=_int("finetune.promote_epochs", finetune_raw.get("promote_epochs", 0), 0, 10_000),
        promote_margin=_float("finetune.promote_margin",
                              finetune_raw.get("promote_margin", NEUTRAL_FINETUNE["promote_margin"]), 0.0, 1.0),
        promote_size_tolerance=_float("finetune.promote_size_tolerance",
                                      finetune_raw.get("promote_size_tolerance", 1.0), 1.0, 100.0),
        prune_activation_power=_float("finetune.prune_activation_power",
                                      finetune_raw.get("prune_activation_power", 0.0), 0.0, 4.0),
        refine_epochs=_int("finetune.refine_epochs", finetune_raw.get("refine_epochs", 0), 0, 10_000),
        refine_top=_int("finetune.refine_top", finetune_raw.get("refine_top", NEUTRAL_FINETUNE["refine_top"]), 1, 10_000),
        refine_within=_float("finetune.refine_within",
                             finetune_raw.get("refine_within", NEUTRAL_FINETUNE["refine_within"]), 0.0, 1.0),
        refine_share=_float("finetune.refine_share", finetune_raw.get("refine_share", NEUTRAL_FINETUNE["refine_share"]),
                            0.0, 0.95),
        weight_ema=_float("finetune.weight_ema", finetune_raw.get("weight_ema", NEUTRAL_FINETUNE["weight_ema"]),
                          0.0, 0.9999),
        augment_shift=_int("finetune.augment_shift", finetune_raw.get("augment_shift", 0), 0, 8),
        augment_in=augment_in,
    )
    cache_mb = _int("finetune.cache_mb", finetune_raw.get("cache_mb", 1024), 0, 1_000_000)

    knob_names = set(PER_LAYER_KNOBS) | set(GLOBAL_KNOBS)
    space_raw = _table(data, "space", {"layers", "exclude", "layer"} | knob_names)
    knobs: dict[str, Knob] = {}
    for knob_name, rule in PER_LAYER_KNOBS.items():
        knobs[knob_name] = parse_knob(f"space.{knob_name}", space_raw.get(knob_name), rule)
    for knob_name, rule in GLOBAL_KNOBS.items():
        knobs[knob_name] = parse_knob(f"space.{knob_name}", space_raw.get(knob_name), rule, per_layer=False)
    overrides_raw = space_raw.get("layer", {})
    if not isinstance(overrides_raw, dict):
        raise SpecError("space.layer", overrides_raw, "tables like [space.layer.\"fc3\"] weight_bits = 8")
    overrides: dict[str, dict[str, float | int]] = {}
    for pattern, fixed in overrides_raw.items():
        key = f"space.layer.{pattern}"
        if not isinstance(fixed, dict):
            raise SpecError(key, fixed, f"a table of fixed values for {sorted(PER_LAYER_KNOBS)}")
        checked: dict[str, float | int] = {}
        for knob_name, value in fixed.items():
            if knob_name not in PER_LAYER_KNOBS:
                raise SpecError(f"{key}.{knob_name}", value, f"keys {sorted(PER_LAYER_KNOBS)}", "is not a known key")
            checked[knob_name] = PER_LAYER_KNOBS[knob_name].check_value(f"{key}.{knob_name}", value)
        overrides[pattern] = checked
    space = SpaceSpec(
        layers=_patterns("space.layers", space_raw.get("layers", ["*"])),
        exclude=_patterns("space.exclude", space_raw.get("exclude", [])) if space_raw.get("exclude") else (),
        knobs=knobs,
        overrides=overrides,
    )

    normalized: dict[str, Any] = {
        "study": {"name": name, "storage": storage, "trials": trials, "seed": seed, "sampler": sampler,
                  "max_accuracy_drop": drop, "heartbeat_interval": heartbeat_interval,
                  "heartbeat_grace": heartbeat_grace,
                  **({} if feasible_drop is None else {"feasible_drop": feasible_drop})},
        "model": {k: v for k, v in {"preset": model.preset, "factory": model.factory, "kwargs": model.kwargs,
                                    "checkpoint": model.checkpoint}.items() if v is not None},
        "data": ({k: v for k, v in {"preset": data_spec.preset, "module": data_spec.module,
                                    "kwargs": data_spec.kwargs}.items() if v is not None}
                 if data_spec.table is None else data_spec.table_options()),
        # augment_shift only when set: specs written before it existed keep their fingerprint
        "teacher": {"epochs": teacher.epochs, "lr": teacher.lr, "batch_size": teacher.batch_size,
                    **({"augment_shift": teacher.augment_shift} if teacher.augment_shift else {})},
        "finetune": {"epochs": finetune.epochs, "batch_size": finetune.batch_size, "cache_mb": cache_mb,
                     "prune_schedule": finetune.prune_schedule, "prune_ramp": finetune.prune_ramp,
                     "promote_epochs": finetune.promote_epochs, "promote_margin": finetune.promote_margin,
                     "promote_size_tolerance": finetune.promote_size_tolerance,
                     "quantizer": finetune.quantizer,
                     "prune_activation_power": finetune.prune_activation_power,
                     "bias_bits": finetune.bias_bits, "refine_epochs": finetune.refine_epochs,
                     "refine_top": finetune.refine_top, "refine_within": finetune.refine_within,
                     "refine_share": finetune.refine_share, "weight_ema": finetune.weight_ema,
                     "augment_shift": finetune.augment_shift, "augment_in": finetune.augment_in},
        "space": {"layers": list(space.layers), "exclude": list(space.exclude),
                  **{k: v.to_dict() for k, v in knobs.items()},
                  "layer": {p: dict(v) for p, v in overrides.items()}},
    }
    try:
        json.dumps(normalized)
    except (TypeError, ValueError):
        raise SpecError("model.kwargs / data.kwargs", "(a value)", "plain TOML values (strings, numbers, lists, tables)") from None
    return StudySpec(name, storage, trials, seed, sampler, drop, model, data_spec, teacher, finetune, space,
                     cache_mb, heartbeat_interval, heartbeat_grace, raw=normalized, feasible_drop=feasible_drop,
                     source=source)
