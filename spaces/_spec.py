"""The study spec: one validated description of a compression search, in sections that say what they are.

A spec comes from a TOML file, a dict or a named preset and is checked completely before
anything is written; every problem is reported at once. Its sections:

- ``[study]`` what the study is: name, storage, trial target, seed, accuracy floor, accuracy goal;
- ``[model]``, ``[data]`` the network and its data;
- ``[objective]`` the validation metric (accuracy by default; regression metrics make it a regression);
- ``[teacher]`` how the teacher is trained (when no checkpoint is given);
- ``[finetune]`` the student's training recipe;
- ``[method.<name>]`` each compression method's options (``[method.prune]``, ``[method.quantize]``);
- ``[search]`` the sampler, and the search's scheduling: ``[search.promote]``, ``[search.refine]``;
- ``[runtime]`` how this machine runs it (memory for the teacher cache, heartbeats);
- ``[space]`` which layers are compressed and how each knob is searched.

Every regular setting is declared once (:mod:`._settings`), with its default, range, neutral
value and help; the README's spec reference is generated from them (:func:`spec_reference`).
The spec is stored in the study (user attrs), so ``slimtune resume`` needs only the study name
and the storage URL. Its :meth:`StudySpec.fingerprint` covers everything that changes what a trial
means and leaves out what does not (name, storage, trial target, search scheduling, runtime), and
settings at their neutral value, so a setting added later keeps old fingerprints. A spec stored
by slimtune 0.1 (one flat ``[finetune]`` table) is read with :func:`upgrade_stored_spec`.

Example:
    >>> spec = parse_spec({"study": {"name": "demo"}, "model": {"preset": "cnn-digits"},
    ...                    "data": {"preset": "digits"}})
    >>> spec.storage, spec.search.sampler, spec.space.knobs["weight_bits"].choices
    ('sqlite:///slimtune.db', 'tpe', (2, 3, 4, 5, 6, 8, 32))
    >>> spec.method("prune").activation_power
    0.5
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from ._errors import SpecError
from ._metrics import DEFAULT_METRIC, METRICS, Metric, objective_metric
from ._knobs import Knob, parse_knob
from ._methods import declarations, knob_declarations, method_sections, per_layer_knobs
from ._settings import Errors, Section, Setting, reference_toml

DEFAULT_STORAGE = "sqlite:///slimtune.db"
SAMPLERS = ("tpe", "nsga2", "gp", "random")
MODEL_PRESETS = ("lenet300", "lenet5", "cnn-digits", "mlp")
DATA_PRESETS = ("mnist", "digits", "breast-cancer")
TABLE_SUFFIXES = (".csv", ".parquet")
MISSING_POLICIES = ("refuse", "drop", "impute")
SPLIT_VALUES = ("train", "val", "test")
AUGMENT_STAGES = ("all", "refine")
# [data] keys that only a table takes, with their defaults (None: no default).
TABLE_KEYS: dict[str, Any] = {"target": None, "categorical": [], "missing": "refuse", "split_column": None,
                              "val_fraction": 0.2, "test_fraction": 0.2, "split_seed": 0, "batch_size": 64}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_REF_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# "user:password@" in something that looks like a URL, masked before it is shown.
_PASSWORD_RE = re.compile(r"([^:/@\s]+:)[^@\s]*@")
# Study keys that change how a study runs, not what its trials mean.
_NOT_FINGERPRINTED = ("name", "storage", "trials", "goal_drop")

TEACHER = Section("teacher", "how the teacher is trained (when model.checkpoint gives none)", (
    Setting("epochs", int, 10, "epochs of training", low=1, high=10_000),
    Setting("lr", float, 1e-3, "learning rate (Adam, cosine decay)", low=0.0, high=1.0, low_open=True),
    Setting("batch_size", int, 128, "training batch size", low=1, high=1_000_000),
    Setting("augment_shift", int, 0, "train on images moved by up to this many pixels (0: off)", low=0, high=8,
            neutral=0),
))
FINETUNE = Section("finetune", "the student's training recipe (its learning rate is the knob space.lr)", (
    Setting("epochs", int, 2, "epochs of every trial's fine-tune", low=1, high=10_000),
    Setting("batch_size", int, 128, "training batch size", low=1, high=1_000_000),
    Setting("weight_ema", float, 0.0, "pack a moving average of the weights with this decay (0: the last step's "
            "weights)", low=0.0, high=0.9999, neutral=0.0),
    Setting("augment_shift", int, 0, "train on images moved by up to this many pixels, with the original image's "
            "label and teacher logits as targets (0: off; image batches only)", low=0, high=8, neutral=0),
    Setting("augment_in", str, "refine", "which fine-tunes shift: all, or only the refinement stage's long runs",
            choices=AUGMENT_STAGES, neutral="all"),
), moved={"prune_schedule": "method.prune.schedule", "prune_ramp": "method.prune.ramp",
          "prune_activation_power": "method.prune.activation_power", "quantizer": "method.quantize.quantizer",
          "bias_bits": "method.quantize.bias_bits", "promote_epochs": "search.promote.epochs",
          "promote_margin": "search.promote.margin", "promote_size_tolerance": "search.promote.size_tolerance",
          "refine_epochs": "search.refine.epochs", "refine_top": "search.refine.top",
          "refine_within": "search.refine.within", "refine_share": "search.refine.share",
          "cache_mb": "runtime.cache_mb"})
SEARCH = Section("search", "the sampler, and when a search with an accuracy goal ends", (
    Setting("sampler", str, "tpe", "tpe (multivariate TPE) | nsga2 | gp (Optuna's Gaussian process) | random; "
            "TPE and GP sample at random until the study holds max(4, min(10, trials // 3)) trials, the seeded plans "
            "([search.seed]) among them", choices=SAMPLERS),
    Setting("goal_patience", int, 10, "with study.goal_drop (search --goal-drop): stop once the smallest plan within "
            "that drop has not shrunk for this many finished trials", low=1, high=1_000_000, fingerprinted=False),
))
PROMOTE = Section("search.promote", "multi-fidelity: the trials no completed trial beats train longer", (
    Setting("epochs", int, 0, "extra epochs for a trial that no completed trial as small or smaller beats by more "
            "than margin (0: off)", low=0, high=10_000, fingerprinted=False),
    Setting("margin", float, 0.002, "validation accuracy a completed trial must lead by to beat it", low=0.0,
            high=1.0, fingerprinted=False),
    Setting("size_tolerance", float, 1.0, "completed trials up to this many times as large compete too", low=1.0,
            high=100.0, fingerprinted=False),
))
REFINE = Section("search.refine", "after the search, the best in-band Pareto plans train again, longer, as new trials",
                 (
    Setting("epochs", int, 0, "extra epochs of a refinement (0: no refinement stage)", low=0, high=10_000,
            fingerprinted=False),
    Setting("top", int, 4, "at most this many plans refined per study, smallest first", low=1, high=10_000,
            fingerprinted=False),
    Setting("within", float, 0.002, "refine plans within this much validation accuracy of the teacher's", low=0.0,
            high=1.0, fingerprinted=False),
    Setting("share", float, 0.25, "share of --timeout left to the refinements", low=0.0, high=0.95,
            fingerprinted=False),
))
SEED = Section("search.seed", "plans the study runs first, before its sampler's own: allocations from a sensitivity "
               "pass (what compressing one layer alone costs) and uniform plans", (
    Setting("plans", int, 6, "plans allocated from the sensitivity pass, spread over the size range (0: none; "
            "the pass runs when plans or uniform is above 0; the -hour presets set 0)",
            low=0, high=1_000, fingerprinted=False),
    Setting("uniform", int, 4, "uniform plans (every layer alike) spread over the size range", low=0, high=1_000,
            fingerprinted=False),
    Setting("calibrated", int, 4, "plans allocated once the seeds above have finished: estimated stronger than the "
            "strongest allocated seed and within the floor times how much the pass overstated those seeds' "
            "fine-tuned drops (at most 10x) (0: none; needs plans or uniform above 0)", low=0, high=1_000,
            fingerprinted=False),
    Setting("samples", int, 2_000, "validation samples the sensitivity pass measures on (whole batches of the "
            "data module's own validation loader, so a few more where a batch ends past it)", low=10,
            high=10_000_000, fingerprinted=False),
))
DEPLOY_OBJECTIVES = ("none", "latency_ms", "onnx_bytes")
OBJECTIVE = Section("objective", "what the search optimizes beside smallness: a validation metric (drops, floors "
                    "and --max-drop are in its units), and a deploy figure if asked", (
    Setting("metric", str, DEFAULT_METRIC, "accuracy, top5_accuracy, f1 (macro), auroc (macro): classification; r2, "
            "mse, mae: regression (a numeric target, one output per sample, distillation by MSE)",
            choices=tuple(METRICS), neutral=DEFAULT_METRIC),
    Setting("deploy", str, "none", "a third objective, minimized, measured on each trial's own integer ONNX file (as "
            "export --onnx writes it) on the worker's machine: none, latency_ms (onnxruntime, one thread, the median "
            "of 50 calls on latency_batch validation inputs) or onnx_bytes (the file's size)",
            choices=DEPLOY_OBJECTIVES, neutral="none"),
    Setting("latency_batch", int, 1, "the batch size latency_ms is timed at", low=1, high=65536, neutral=1),
    Setting("monitor", str, "", "a value the model's own LightningModule logs in validation_step (self.log, as "
            "Lightning's ModelCheckpoint monitors it) to optimize instead of metric, which then only says the task "
            "(a regression metric: distillation by MSE) and what an ONNX export is checked on", neutral=""),
    Setting("mode", str, "max", "max or min: whether a larger monitor value is better", choices=("max", "min"),
            neutral="max"),
))
LOGGERS = ("none", "csv", "tensorboard")
ACCELERATORS = ("auto", "cpu", "gpu", "mps")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
RUNTIME = Section("runtime", "how this machine runs the study (none of it changes what a trial means)", (
    Setting("cache_mb", int, 1024, "memory for cached teacher features (logits are always cached)", low=0,
            high=1_000_000, fingerprinted=False),
    Setting("heartbeat_interval", int, 20, "seconds between a running trial's heartbeats", low=1, high=3600,
            fingerprinted=False),
    Setting("heartbeat_grace", int, 60, "silence after which another worker fails and retries a trial", low=2,
            high=86400, fingerprinted=False),
    Setting("logger", str, "none", "a Lightning logger for every fine-tune (and the teacher's training): none, csv "
            "(lightning's CSVLogger) or tensorboard (needs the tensorboard package)", choices=LOGGERS,
            fingerprinted=False),
    Setting("log_dir", str, "slimtune-logs", "the logger's folder: <log_dir>/<study>/trial-<number> (and /teacher)",
            fingerprinted=False),
    Setting("accelerator", str, "auto", "where fine-tunes, the teacher's training and the sensitivity pass run "
            "(Lightning's Trainer accelerator): auto (a GPU when there is one), cpu, gpu or mps", choices=ACCELERATORS,
            fingerprinted=False),
    Setting("precision", str, "32-true", "Lightning's Trainer precision for fine-tunes and the teacher's training: "
            "32-true, 16-mixed or bf16-mixed (mixed precision on a GPU)", choices=PRECISIONS, fingerprinted=False),
    Setting("dashboard_every", int, 5, "refresh slimtune's plots on the study's optuna-dashboard page every this many "
            "finished trials (0: at the start and the end of a run only)", low=0, high=1_000_000, fingerprinted=False),
))


def regular_sections() -> list[Section]:
    """The declared sections, in the order the spec reference lists them."""
    return [OBJECTIVE, TEACHER, FINETUNE, *method_sections(), SEARCH, PROMOTE, REFINE, SEED, RUNTIME]


class Values:
    """A section's values as attributes (``spec.finetune.epochs``); read-only.

    >>> Values("runtime", {"cache_mb": 1024}).cache_mb
    1024
    """

    def __init__(self, section: str, values: Mapping[str, Any], **children: Values) -> None:
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_values", {**dict(values), **children})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"[{self._section}] has no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("spec values are read-only")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Values) and self._values == other._values

    def __repr__(self) -> str:
        return f"Values({self._section!r}, {self._values!r})"


@dataclass(frozen=True)
class ModelSpec:
    """Which network to compress: a preset name, or ``package.module:factory`` plus kwargs."""

    preset: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    # A model given to ``slimtune.search`` as a Python object: its class, as ``module:qualname``,
    # for people to read (never imported; see ``slimtune.trainers.build_model``).
    given: str | None = None
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
    given: str | None = None  # a data module given to ``slimtune.search`` as an object (see ModelSpec.given)
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
class SpaceSpec:
    """Which layers are compressible and how every knob is searched.

    ``layers``/``exclude`` are shell-style name patterns (``fnmatch``) over the names of the
    model's compressible layers. ``overrides`` fixes knobs for the layers that a pattern
    matches, e.g. ``{"fc3": {"weight_bits": 8}}``.
    """

    layers: tuple[str, ...]
    exclude: tuple[str, ...]
    knobs: dict[str, Knob]
    overrides: dict[str, dict[str, float | int]]


@dataclass(frozen=True)
class StudySpec:
    """A complete, validated study definition (see the module docstring for its sections)."""

    name: str
    storage: str
    trials: int
    seed: int
    max_accuracy_drop: float
    model: ModelSpec
    data: DataSpec
    teacher: Values
    finetune: Values
    methods: dict[str, Values]
    search: Values
    runtime: Values
    space: SpaceSpec
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    feasible_drop: float | None = None  # val accuracy constraint, None = none
    goal_drop: float | None = None  # end the search once the smallest plan within it stops shrinking
    source: str | None = field(default=None, compare=False)  # None: the user's own spec (see ModelSpec)
    objective: Values = field(default_factory=lambda: Values("objective", {"metric": DEFAULT_METRIC, "deploy": "none",
                                                                            "latency_batch": 1, "monitor": "",
                                                                            "mode": "max"}))

    @property
    def metric(self) -> Metric:
        """The validation metric the study optimizes (``[objective] metric``, or ``monitor``)."""
        return objective_metric({k: getattr(self.objective, k) for k in ("metric", "monitor", "mode")
                                 if hasattr(self.objective, k)})

    @property
    def deploy(self) -> str | None:
        """The third objective (``[objective] deploy``: ``latency_ms`` or ``onnx_bytes``), or ``None``."""
        chosen = getattr(self.objective, "deploy", "none")
        return None if chosen == "none" else chosen

    def method(self, name: str) -> Values:
        """The options of method ``name`` (``[method.<name>]``); a method without options has none."""
        return self.methods.get(name) or Values(f"method.{name}", {})

    def to_dict(self) -> dict[str, Any]:
        """The normalized spec (defaults filled in) as plain data; ``parse_spec`` reads it back."""
        return json.loads(json.dumps(self.raw))

    def fingerprint(self) -> str:
        """A short hash of everything that changes what a trial means."""
        raw = self.raw
        body: dict[str, Any] = {
            "study": {k: v for k, v in raw["study"].items() if k not in _NOT_FINGERPRINTED},
            "model": raw["model"], "data": raw["data"],
        }
        for section in regular_sections():
            part = section.fingerprint_part(_get(raw, section.name))
            if part:
                body[section.name] = part
        neutral = {name: decl.neutral_table for name, decl in knob_declarations().items()}
        body["space"] = {k: v for k, v in raw["space"].items() if not (neutral.get(k) is not None and v == neutral[k])}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_overrides(self, **changes: Any) -> StudySpec:
        """A copy with study-level values replaced (``name``, ``storage``, ``trials``, ``seed``;
        ``sampler`` goes to ``[search]``)."""
        raw = self.to_dict()
        for key, value in changes.items():
            if value is not None:
                (raw["search"] if key == "sampler" else raw["study"])[key] = value
        return parse_spec(raw, source=self.source)


def _get(raw: Mapping[str, Any], dotted: str) -> Any:
    """``raw["method"]["prune"]`` for ``"method.prune"``; ``None`` if absent."""
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


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
    if "given" in raw:
        given = raw["given"]
        if not isinstance(given, str) or not given or len(raw) != 1:
            raise SpecError("data.given", given, "the class of a data module given to slimtune.search, as "
                            "module:qualname, alone")
        return DataSpec(given=given, source=source)
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


_DATA_KEYS = {"preset", "module", "kwargs", "table", "given"} | set(TABLE_KEYS)


def parse_data_section(raw: Any, source: str | None = None) -> DataSpec:
    """A ``[data]`` section alone (as an artifact's meta holds it), validated as in a spec.

    >>> parse_data_section({"preset": "digits"}).preset
    'digits'
    """
    return _data_spec(_table({"data": raw}, "data", _DATA_KEYS), source)


_STUDY_KEYS = {"name", "storage", "trials", "seed", "max_accuracy_drop", "feasible_drop", "goal_drop"}
_STUDY_MOVED = {"sampler": "search.sampler", "heartbeat_interval": "runtime.heartbeat_interval",
                "heartbeat_grace": "runtime.heartbeat_grace"}


def _study(raw: Any, errors: Errors, high: float = 1.0) -> dict[str, Any]:
    """The ``[study]`` table; drops are numbers in ``[0, high]`` (see :func:`drop_bound`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        errors.add(SpecError("study", raw, f"a table with keys {sorted(_STUDY_KEYS)}"))
        raw = {}
    for key, value in raw.items():
        if key in _STUDY_MOVED:
            errors.add(SpecError(f"study.{key}", value, f"the key {_STUDY_MOVED[key]}", "has moved (since slimtune 0.2)"))
        elif key not in _STUDY_KEYS:
            errors.add(SpecError(f"study.{key}", value, f"keys {sorted(_STUDY_KEYS)}", "is not a known key"))
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        errors.add(SpecError("study.name", name, "1-100 letters, digits, '.', '_' or '-', starting with a letter or "
                             "digit"))
    storage = raw.get("storage", DEFAULT_STORAGE)
    if not isinstance(storage, str) or "://" not in storage:
        shown = _PASSWORD_RE.sub(r"\1***@", storage) if isinstance(storage, str) else storage
        errors.add(SpecError("study.storage", shown, "a SQLAlchemy URL such as sqlite:///slimtune.db or "
                             "postgresql+psycopg://user:password@host/db"))
    out = {
        "name": name, "storage": storage,
        "trials": errors.catch(lambda: _int("study.trials", raw.get("trials", 20), 1, 1_000_000), 20),
        "seed": errors.catch(lambda: _int("study.seed", raw.get("seed", 0), 0, 2**31 - 1), 0),
        "max_accuracy_drop": errors.catch(lambda: _float("study.max_accuracy_drop",
                                                         raw.get("max_accuracy_drop", 0.05), 0.0, high), 0.05),
    }
    if raw.get("feasible_drop") is not None:
        out["feasible_drop"] = errors.catch(lambda: _float("study.feasible_drop", raw["feasible_drop"], 0.0, high))
    if raw.get("goal_drop") is not None:
        out["goal_drop"] = errors.catch(lambda: _float("study.goal_drop", raw["goal_drop"], 0.0, high))
    return out


def _check_monitor(raw: Any, objective: dict[str, Any], errors: Errors) -> None:
    """``monitor`` names a logged value (not blank, not a built-in metric's name); ``mode`` needs it."""
    monitor = objective.get("monitor", "")
    if monitor and (not monitor.strip() or monitor in METRICS):
        errors.add(SpecError("objective.monitor", monitor, "the name a LightningModule logs in validation_step "
                             f"(for {', '.join(METRICS)} use objective.metric)"))
        objective["monitor"] = ""
    if isinstance(raw, Mapping) and raw.get("mode", "max") != "max" and not monitor:  # a stored spec has "max"
        errors.add(SpecError("objective.mode", raw["mode"], "mode only with objective.monitor (a built-in metric "
                             "has its own direction)"))


def drop_bound(metric: Metric) -> float:
    """The largest drop of a metric: 1 for one in [0, 1] (accuracy, F1, AUROC, R²), else unbounded
    (MSE, MAE: drops in the target's units)."""
    return float("inf") if metric.name in ("mse", "mae") or metric.logged else 1.0


def _model(raw: Any, source: str | None) -> ModelSpec:
    model_raw = _table({"model": raw} if raw is not None else {}, "model",
                       {"preset", "factory", "given", "kwargs", "checkpoint"})
    if sum(k in model_raw for k in ("preset", "factory", "given")) != 1:
        raise SpecError("model", model_raw, "exactly one of 'preset' or 'factory' ('given' is written by "
                        "slimtune.search for a model passed as a Python object)")
    given = model_raw.get("given")
    if given is not None and (not isinstance(given, str) or not given or "kwargs" in model_raw
                              or "checkpoint" in model_raw):
        raise SpecError("model.given", given, "the class of a model given to slimtune.search, as module:qualname, "
                        "without kwargs or checkpoint")
    if "preset" in model_raw and model_raw["preset"] not in MODEL_PRESETS:
        raise SpecError("model.preset", model_raw["preset"], ", ".join(MODEL_PRESETS))
    checkpoint = model_raw.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise SpecError("model.checkpoint", checkpoint, "a path to a state_dict saved with torch.save")
    return ModelSpec(
        preset=model_raw.get("preset"),
        factory=_ref("model.factory", model_raw["factory"], "factory") if "factory" in model_raw else None,
        kwargs=_kwargs("model.kwargs", model_raw.get("kwargs", {})),
        checkpoint=checkpoint,
        given=given,
        source=source,
    )


def _space(raw: Any, errors: Errors) -> SpaceSpec:
    knob_decls = knob_declarations()
    per_layer = {k.name: k for k in per_layer_knobs()}
    allowed = {"layers", "exclude", "layer"} | set(knob_decls)
    space_raw: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    if raw is not None and not isinstance(raw, Mapping):
        errors.add(SpecError("space", raw, f"a table with keys {sorted(allowed)}"))
    for key, value in space_raw.items():
        if key not in allowed:
            errors.add(SpecError(f"space.{key}", value, f"keys {sorted(allowed)}", "is not a known key"))
    knobs: dict[str, Knob] = {}
    for name, decl in knob_decls.items():
        knobs[name] = errors.catch(lambda: parse_knob(f"space.{name}", space_raw.get(name), decl),
                                   parse_knob(f"space.{name}", None, decl))
    overrides_raw = space_raw.get("layer", {})
    overrides: dict[str, dict[str, float | int]] = {}
    if not isinstance(overrides_raw, dict):
        errors.add(SpecError("space.layer", overrides_raw, "tables like [space.layer.\"fc3\"] weight_bits = 8"))
        overrides_raw = {}
    for pattern, fixed in overrides_raw.items():
        key = f"space.layer.{pattern}"
        if not isinstance(fixed, dict):
            errors.add(SpecError(key, fixed, f"a table of fixed values for {sorted(per_layer)}"))
            continue
        checked: dict[str, float | int] = {}
        for knob_name, value in fixed.items():
            if knob_name not in per_layer:
                errors.add(SpecError(f"{key}.{knob_name}", value, f"keys {sorted(per_layer)}", "is not a known key"))
                continue
            checked[knob_name] = errors.catch(lambda: per_layer[knob_name].check_value(f"{key}.{knob_name}", value),
                                              value)
        overrides[pattern] = checked
    return SpaceSpec(
        layers=errors.catch(lambda: _patterns("space.layers", space_raw.get("layers", ["*"])), ("*",)),
        exclude=errors.catch(lambda: _patterns("space.exclude", space_raw["exclude"]) if space_raw.get("exclude")
                             else (), ()),
        knobs=knobs,
        overrides=overrides,
    )


def parse_spec(data: Mapping[str, Any], source: str | None = None) -> StudySpec:
    """Validate a spec given as plain data (parsed TOML) and fill in defaults; every problem is
    reported at once (a :class:`SpecError` whose message lists them all).

    ``source`` says where the data was read when it is not the user's own input (the spec stored
    in a study): its model factory and data module are then imported only if trusted.
    """
    if not isinstance(data, Mapping):
        raise SpecError("spec", data, "a table")
    errors = Errors()
    method_names = {d.name for d in declarations() if d.options}
    top = {"study", "model", "data", "objective", "teacher", "finetune", "method", "search", "runtime", "space"}
    for k in data:
        if k not in top:
            errors.add(SpecError(k, data[k], f"sections {sorted(top)}", "is not a known section"))
    objective = OBJECTIVE.parse(data.get("objective"), errors)  # first: it bounds the study's drops
    _check_monitor(data.get("objective"), objective, errors)
    study = _study(data.get("study"), errors, drop_bound(objective_metric(objective)))
    model = errors.catch(lambda: _model(data.get("model"), source))
    data_spec = errors.catch(lambda: _data_spec(_table({"data": data.get("data", {})}, "data", _DATA_KEYS), source))
    teacher = TEACHER.parse(data.get("teacher"), errors)
    finetune = FINETUNE.parse(data.get("finetune"), errors)
    methods_raw = data.get("method", {})
    if not isinstance(methods_raw, Mapping):
        errors.add(SpecError("method", methods_raw, f"tables [method.<name>] for {sorted(method_names)}"))
        methods_raw = {}
    for name in methods_raw:
        if name not in method_names:
            errors.add(SpecError(f"method.{name}", methods_raw[name], f"methods with options: {sorted(method_names)}",
                                 "is not a known method"))
    methods = {section.name.split(".", 1)[1]: section.parse(methods_raw.get(section.name.split(".", 1)[1]), errors)
               for section in method_sections()}
    search_raw = data.get("search")
    search = SEARCH.parse(search_raw, errors, allow=("promote", "refine", "seed"))
    search_raw = search_raw if isinstance(search_raw, Mapping) else {}
    promote = PROMOTE.parse(search_raw.get("promote"), errors)
    refine = REFINE.parse(search_raw.get("refine"), errors)
    seed = SEED.parse(search_raw.get("seed"), errors)
    runtime = RUNTIME.parse(data.get("runtime"), errors)
    log_dir = PurePath(str(runtime["log_dir"]))
    if not str(runtime["log_dir"]) or log_dir.is_absolute() or ".." in log_dir.parts:
        # a stored spec is data: it may not choose where a worker writes outside its working directory
        errors.add(SpecError("runtime.log_dir", runtime["log_dir"], "a relative folder without '..' (under the "
                             "working directory)"))
    if runtime["heartbeat_grace"] <= runtime["heartbeat_interval"]:
        errors.add(SpecError("runtime.heartbeat_grace", runtime["heartbeat_grace"],
                             f"more seconds than heartbeat_interval ({runtime['heartbeat_interval']})"))
    space = _space(data.get("space"), errors)
    errors.raise_any()
    assert model is not None and data_spec is not None

    normalized: dict[str, Any] = {
        "study": study,
        "model": ({"given": model.given} if model.given is not None else
                  {k: v for k, v in {"preset": model.preset, "factory": model.factory, "kwargs": model.kwargs,
                                     "checkpoint": model.checkpoint}.items() if v is not None}),
        "data": ({"given": data_spec.given} if data_spec.given is not None else
                 {k: v for k, v in {"preset": data_spec.preset, "module": data_spec.module,
                                    "kwargs": data_spec.kwargs}.items() if v is not None}
                 if data_spec.table is None else data_spec.table_options()),
        "objective": objective,
        "teacher": teacher,
        "finetune": finetune,
        "method": methods,
        "search": {**search, "promote": promote, "refine": refine, "seed": seed},
        "runtime": runtime,
        "space": {"layers": list(space.layers), "exclude": list(space.exclude),
                  **{k: v.to_dict() for k, v in space.knobs.items()},
                  "layer": {p: dict(v) for p, v in space.overrides.items()}},
    }
    try:
        json.dumps(normalized)
    except (TypeError, ValueError):
        raise SpecError("model.kwargs / data.kwargs", "(a value)", "plain TOML values (strings, numbers, lists, "
                        "tables)") from None
    return StudySpec(
        name=study["name"], storage=study["storage"], trials=study["trials"], seed=study["seed"],
        max_accuracy_drop=study["max_accuracy_drop"], model=model, data=data_spec,
        teacher=Values("teacher", teacher), finetune=Values("finetune", finetune),
        methods={name: Values(f"method.{name}", values) for name, values in methods.items()},
        search=Values("search", search, promote=Values("search.promote", promote),
                      refine=Values("search.refine", refine), seed=Values("search.seed", seed)),
        runtime=Values("runtime", runtime), space=space, raw=normalized, objective=Values("objective", objective),
        feasible_drop=study.get("feasible_drop"), goal_drop=study.get("goal_drop"), source=source)


# How a spec stored by slimtune 0.1 names what now lives elsewhere, and the values it meant when
# a key was absent (a spec stored before that key existed).
_V01_FINETUNE = {
    "prune_schedule": ("method", "prune", "schedule", "oneshot"), "prune_ramp": ("method", "prune", "ramp", 0.5),
    "prune_activation_power": ("method", "prune", "activation_power", 0.0),
    "quantizer": ("method", "quantize", "quantizer", "amax"), "bias_bits": ("method", "quantize", "bias_bits", 32),
    "promote_epochs": ("search", "promote", "epochs", 0), "promote_margin": ("search", "promote", "margin", 0.002),
    "promote_size_tolerance": ("search", "promote", "size_tolerance", 1.0),
    "refine_epochs": ("search", "refine", "epochs", 0), "refine_top": ("search", "refine", "top", 4),
    "refine_within": ("search", "refine", "within", 0.002), "refine_share": ("search", "refine", "share", 0.25),
    "seed_plans": ("search", "seed", "plans", 0), "seed_uniform": ("search", "seed", "uniform", 0),
}
_V01_FINETUNE_KEPT = {"weight_ema": 0.0, "augment_shift": 0, "augment_in": "all"}
_V01_SPACE = {"rank_ratio": {"fixed": 1.0}, "unit_ratio": {"fixed": 1.0}, "l1_weight": {"fixed": 0.0}}


def is_v01_spec(raw: Mapping[str, Any]) -> bool:
    """Whether a stored spec has slimtune 0.1's shape (one flat ``[finetune]``, no ``[search]``)."""
    return isinstance(raw, Mapping) and "search" not in raw and "method" not in raw and "runtime" not in raw


def upgrade_stored_spec(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A spec stored by slimtune 0.1, in this version's sections, meaning the same trials: every
    key 0.1 left out is written with the value it meant then (which is not always today's
    default). A spec already in this version's shape is returned as it is, but for a ``[search]``
    stored before ``[search.seed]`` existed, which gets the no seeds it meant (and one stored before
    ``calibrated`` existed, no calibrated wave).

    >>> old = {"study": {"name": "x", "sampler": "tpe", "heartbeat_interval": 20, "heartbeat_grace": 60},
    ...        "model": {"preset": "lenet300"}, "data": {"preset": "mnist"},
    ...        "finetune": {"epochs": 2, "batch_size": 128, "cache_mb": 1024, "quantizer": "lsq"}, "space": {}}
    >>> new = upgrade_stored_spec(old)
    >>> new["method"]["quantize"], new["search"]["sampler"], new["runtime"]["cache_mb"]
    ({'quantizer': 'lsq', 'bias_bits': 32}, 'tpe', 1024)
    """
    if not is_v01_spec(raw):
        spec = copy.deepcopy(dict(raw))
        if isinstance(spec.get("search"), dict) and "seed" not in spec["search"]:
            spec["search"]["seed"] = {"plans": 0, "uniform": 0}  # stored before seeding existed: none, as then
        seed = spec.get("search", {}).get("seed") if isinstance(spec.get("search"), dict) else None
        if isinstance(seed, dict) and "calibrated" not in seed:
            seed["calibrated"] = 0  # stored before the calibrated wave existed: none, as then
        return spec
    old = copy.deepcopy(dict(raw))
    study = dict(old.get("study", {}))
    finetune = dict(old.get("finetune", {}))
    new: dict[str, Any] = {k: v for k, v in old.items() if k not in ("study", "finetune")}
    new["study"] = {k: v for k, v in study.items() if k not in ("sampler", "heartbeat_interval", "heartbeat_grace")}
    new["search"] = {"sampler": study.get("sampler", "tpe"), "promote": {}, "refine": {}, "seed": {}}
    new["runtime"] = {"cache_mb": finetune.pop("cache_mb", 1024),
                      "heartbeat_interval": study.get("heartbeat_interval", 20),
                      "heartbeat_grace": study.get("heartbeat_grace", 60)}
    new["method"] = {"prune": {}, "quantize": {}}
    for key, (top, section, name, meant) in _V01_FINETUNE.items():
        target = new[top][section] if top == "search" else new[top].setdefault(section, {})
        target[name] = finetune.pop(key, meant)
    new["finetune"] = {**{k: finetune.pop(k, v) for k, v in _V01_FINETUNE_KEPT.items()}, **finetune}
    new["teacher"] = {"augment_shift": 0, **old.get("teacher", {})}
    space = dict(old.get("space", {}))
    for knob, meant in _V01_SPACE.items():
        space.setdefault(knob, meant)
    for decl in per_layer_knobs():  # knobs added since: off, as they were
        if decl.neutral_table is not None and decl.name not in space:
            space[decl.name] = decl.neutral_table
    for decl in knob_declarations().values():
        if decl.neutral_table is not None and decl.name not in space:
            space[decl.name] = decl.neutral_table
    new["space"] = space
    return new


def spec_reference() -> str:
    """The reference of every declared section (TOML, defaults and help): what the README shows."""
    return reference_toml(regular_sections())
