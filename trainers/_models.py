"""Model presets and loading a user's model.

Presets:
- ``lenet300``: LeNet-300-100, fully connected 784-300-100-10 (Han et al. 2016).
- ``lenet5``: the Caffe LeNet-5 of Deep Compression: conv 20@5x5, max-pool, conv 50@5x5,
  max-pool, fc 500, ReLU, fc 10 (no activation after the convolutions, as in Caffe).
- ``cnn-digits``: a small CNN for 8x8 scikit-learn digits.
- ``mlp``: a multilayer perceptron for tables, ``kwargs = { hidden = [64, 32] }``: layers
  ``fc1``, ``fc2``, ... (ReLU after each) and ``out``. Its input size and class count come
  from the data module (``input_dim``, ``num_classes``; see ``data_info`` of
  :func:`build_model`).

A user model is any ``nn.Module`` returning logits, named ``package.module:factory``.
:func:`model_from_meta` rebuilds the architecture of a packed artifact (factorized layers
included) from its ``meta``.

Example:
    >>> import torch
    >>> from slimtune.spaces import ModelSpec
    >>> model = build_model(ModelSpec(preset="lenet300"))
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> compressible_layers(model)
    ['fc1', 'fc2', 'fc3']
"""

from __future__ import annotations

import copy
import importlib
import math
import sys
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from slimtune.spaces import MODEL_PRESETS, TRUST_ENV, ModelSpec, SpecError, require_trusted

from ._fold import rebuild_folded
from .methods import is_compressible, methods


class LeNet300(nn.Module):
    """LeNet-300-100: 784-300-100-10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """Caffe LeNet-5 (as compressed in Deep Compression), 431k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 28, 28)
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: conv 16@3x3, conv 32@3x3, pool, fc 64, fc 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TableMLP(nn.Module):
    """A multilayer perceptron for tabular data: ``fc1``, ``fc2``, ... with ReLU, then ``out``.

    Example:
        >>> model = TableMLP(input_dim=30, num_classes=2, hidden=[16, 8])
        >>> [name for name, _ in model.named_children()], model(torch.zeros(4, 30)).shape
        (['fc1', 'fc2', 'out'], torch.Size([4, 2]))
    """

    def __init__(self, input_dim: int, num_classes: int, hidden: Sequence[int] = (64, 32), target_mean: float = 0.0,
                 target_std: float = 1.0) -> None:
        super().__init__()
        self.target_mean, self.target_std = float(target_mean), float(target_std)  # a regression's output scale
        for key, value in (("input_dim", input_dim), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if (isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence)
                or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden)):
            raise ValueError(f"hidden must be a list of positive integers (layer widths), got {hidden!r}")
        self.hidden_names: list[str] = []
        width = input_dim
        for i, size in enumerate(hidden, start=1):
            setattr(self, f"fc{i}", nn.Linear(width, size))
            self.hidden_names.append(f"fc{i}")
            width = size
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for name in self.hidden_names:
            x = torch.relu(getattr(self, name)(x))
        out = self.out(x)
        return out if self.target_std == 1.0 and self.target_mean == 0.0 else out * self.target_std + self.target_mean


PRESET_MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "cnn-digits": DigitsCNN,
    "mlp": TableMLP,
}
# Presets whose sizes come from the data module (``data_info``), unless given in kwargs.
DATA_SIZED_PRESETS = {"mlp": ("input_dim", "num_classes")}
DATA_TARGET_SCALE = {"mlp": ("target_mean", "target_std")}
assert set(PRESET_MODELS) == set(MODEL_PRESETS)


_ANNOUNCED: set[tuple[str, str | None]] = set()  # (reference, source) already said in this process


def import_ref(ref: str, key: str, source: str | None) -> object:
    """Import ``package.module:name``; a failure is a :class:`SpecError` naming ``key``.

    ``source`` is where the reference was read: ``None`` for the user's own input; anything else
    (a stored spec, an artifact) is imported only if its module is trusted (see
    :func:`slimtune.spaces.require_trusted`). Each import is announced once on stderr.
    """
    require_trusted(ref, key, source)
    module_name, _, attr = ref.partition(":")
    if (ref, source) not in _ANNOUNCED:
        why = "from your own spec" if source is None else f"named by {source}, trusted by {TRUST_ENV}"
        print(f"slimtune: importing {key} {ref} ({why})", file=sys.stderr)
        _ANNOUNCED.add((ref, source))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's to fix
        raise SpecError(key, ref, "an importable 'package.module:name' on the Python path",
                        f"cannot be imported ({type(exc).__name__}: {exc})") from None
    if not hasattr(module, attr):
        raise SpecError(key, ref, f"a name defined in module {module_name}", f"has no attribute {attr!r}")
    return getattr(module, attr)


def given_object_error(part: str, given: str) -> SpecError:
    """Why a study's model or data, given to ``slimtune.search`` as a Python object, cannot be
    built by this process (``resume``, ``worker``, ``evaluate``), and what to do instead."""
    builder = "factory='module:callable'" if part == "model" else "data_module='module:DataModuleClass'"
    return SpecError(f"{part}.given", given, f"continue it from Python, in a process that holds the {part} "
                     "(slimtune.search(model, datamodule, study=..., storage=...)"
                     + (", or load_artifact(path, template=model) for a file" if part == "model" else "")
                     + f"), or pass {builder} to slimtune.search so that resume, worker and evaluate can build it",
                     "was given to slimtune.search as a Python object, which this process does not have")


def build_model(spec: ModelSpec, load_checkpoint: bool = True,
                data_info: Mapping[str, int] | None = None) -> nn.Module:
    """A fresh model from a preset or a user factory, optionally with its checkpoint loaded.

    ``data_info`` (``{"input_dim": ..., "num_classes": ...}``, from ``datamodule_info(dm)``)
    sizes the presets that depend on the data (``mlp``); ``model.kwargs`` may also give them.
    """
    if spec.given is not None:
        raise given_object_error("model", spec.given)
    if spec.preset is not None:
        kwargs = dict(spec.kwargs)
        for key in DATA_TARGET_SCALE.get(spec.preset, ()):  # a regression table's target scale, when it says it
            if key not in kwargs and data_info and key in data_info:
                kwargs[key] = float(data_info[key])
        for key in DATA_SIZED_PRESETS.get(spec.preset, ()):
            if key not in kwargs:
                if not data_info or key not in data_info:
                    raise SpecError("model.preset", spec.preset, "data that tells the model its size: a [data] table, "
                                    "the breast-cancer preset, or a data module with input_dim and num_classes "
                                    f"(or model.kwargs.{key})", f"needs {key}, and the data does not say it")
                kwargs[key] = int(data_info[key])
        try:
            model = PRESET_MODELS[spec.preset](**kwargs)
        except (TypeError, ValueError) as exc:
            raise SpecError("model.kwargs", spec.kwargs, f"keyword arguments of the {spec.preset} preset",
                            f"are not accepted ({exc})") from None
    else:
        assert spec.factory is not None
        factory = import_ref(spec.factory, "model.factory", spec.source)
        try:
            model = factory(**spec.kwargs)  # type: ignore[operator]
        except Exception as exc:
            raise SpecError("model.factory", spec.factory, "a callable returning an nn.Module",
                            f"failed when called ({type(exc).__name__}: {exc})") from None
        if not isinstance(model, nn.Module):
            raise SpecError("model.factory", spec.factory, "a callable returning an nn.Module",
                            f"returned {type(model).__name__}")
    if load_checkpoint and spec.checkpoint:
        try:
            state = torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            model.load_state_dict(state)
        except Exception as exc:
            raise SpecError("model.checkpoint", spec.checkpoint, "a state_dict of this model saved with torch.save",
                            f"cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return model


ARTIFACT_SOURCE = "a packed artifact"
_REFERENCE_KEYS = {"preset", "factory", "kwargs", "checkpoint"}


def _reference_in(meta: Mapping[str, Any], source: str | None) -> ModelSpec:
    """The model reference of ``meta``, checked as data: known keys and types only."""
    reference = meta.get("model") if isinstance(meta, Mapping) else None
    if not isinstance(reference, Mapping):
        raise SpecError("artifact", "meta", "an artifact whose meta holds the model reference",
                        "has no model reference")
    if set(reference) == {"given"}:  # a model given to slimtune.search: no process but its own can build it
        raise given_object_error("model", str(reference["given"])[:200])
    unknown = sorted(set(reference) - _REFERENCE_KEYS)
    preset, factory, kwargs = reference.get("preset"), reference.get("factory"), reference.get("kwargs", {})
    problem = None
    if unknown:
        problem = f"has unknown keys {unknown}"
    elif (preset is None) == (factory is None):
        problem = "names neither exactly one preset nor one factory"
    elif preset is not None and preset not in PRESET_MODELS:
        problem = f"names an unknown preset {preset!r}"
    elif factory is not None and (not isinstance(factory, str) or ":" not in factory):
        problem = f"has a factory {factory!r} that is not 'package.module:name'"
    elif not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        problem = "has keyword arguments that are not a table"
    if problem:
        raise SpecError("artifact", "meta.model", f"a model reference written by slimtune (presets: "
                        f"{', '.join(MODEL_PRESETS)})", problem)
    return ModelSpec(preset=preset, factory=factory, kwargs=dict(kwargs), source=source)


def model_from_meta(meta: Mapping[str, Any], data_info: Mapping[str, int] | None = None,
                    source: str | None = ARTIFACT_SOURCE,
                    state: Mapping[str, torch.Tensor] | None = None,
                    template: nn.Module | None = None) -> nn.Module:
    """The architecture of a packed artifact, with placeholder weights to load its state into.

    ``meta`` is what ``unpack_model`` returns: ``meta["model"]`` names the model (its
    checkpoint is never loaded), ``meta["factorized"]`` (if any) maps layer names to the rank
    of their low-rank factorization, and ``meta["data_info"]`` sizes data-dependent presets
    unless ``data_info`` is given. Bad meta is a :class:`SpecError` (key ``artifact``).

    ``source`` says where ``meta`` was read: a factory it names is imported only if trusted
    (``None``: meta slimtune just wrote from the user's own spec). With ``state``, the model is
    first built without memory (``torch.device("meta")``) and its parameter shapes compared with
    the state's, so meta cannot make it allocate more than the artifact holds. ``template``: the
    uncompressed model to start from instead of the one meta names (a copy of it is changed; the
    Python API passes the model it was given).

    Example:
        >>> from slimtune.trainers import pack_model, unpack_model
        >>> from slimtune.spaces import CompressionPlan, LayerPlan
        >>> from slimtune.trainers import apply_plan
        >>> meta = {"model": {"preset": "mlp", "kwargs": {"hidden": [8]}},
        ...         "data_info": {"input_dim": 5, "num_classes": 3}}
        >>> plan = CompressionPlan({"fc1": LayerPlan(weight_bits=8, rank_ratio=0.5)}, kd_alpha=1.0,
        ...                        feature_kd_weight=0.0, lr=1e-3)
        >>> net = apply_plan(model_from_meta(meta), plan)
        >>> state, meta = unpack_model(pack_model(net, meta))
        >>> meta["factorized"], sorted(model_from_meta(meta, state=state).load_state_dict(state).missing_keys)
        ({'fc1': 2}, [])
    """
    if template is not None:
        model = copy.deepcopy(template)
        rebuild_folded(model, meta)
        for method in methods():
            method.rebuild(model, meta)
        if state is not None:
            _check_fits(model, state)
        return model
    spec = _reference_in(meta, source)
    sizes = data_info if data_info is not None else meta.get("data_info")
    if sizes is not None and (not isinstance(sizes, Mapping) or not all(
            (isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**31) if k not in ("target_mean", "target_std")
            else (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
            for k, v in sizes.items())):
        raise SpecError("artifact", "meta.data_info", "positive integer sizes", "is unreadable")
    if state is not None:
        with torch.device("meta"):
            _check_fits(_architecture(spec, meta, sizes), state)
    return _architecture(spec, meta, sizes)


def first_parameter_difference(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor name whose presence or shape differs between two state dicts, or ``None``.

    >>> first_parameter_difference(nn.Linear(2, 3).state_dict(), nn.Linear(2, 4).state_dict())
    'bias'
    """
    wanted = {k: tuple(v.shape) for k, v in expected.items()}
    given = {k: tuple(v.shape) for k, v in got.items()}
    if wanted == given:
        return None
    return (sorted(set(wanted) ^ set(given)) or sorted(k for k in wanted if wanted[k] != given[k]))[0]


def _check_fits(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    differ = first_parameter_difference(model.state_dict(), state)
    if differ is not None:
        raise SpecError("artifact", "meta.model", "an artifact whose tensors fit the model it names",
                        f"does not fit its tensors (first difference: {differ})")


def _architecture(spec: ModelSpec, meta: Mapping[str, Any], data_info: Mapping[str, int] | None) -> nn.Module:
    model = build_model(spec, load_checkpoint=False, data_info=data_info)
    rebuild_folded(model, meta)  # batch norms folded into their layers
    for method in methods():  # e.g. low rank: the factorized layers' two thin factors
        method.rebuild(model, meta)
    return model


def compressible_layers(model: nn.Module) -> list[str]:
    """Names of the layers the methods compress (``Linear``, ``Conv1d``, ``Conv2d``,
    ``Embedding``, ``MultiheadAttention``, ``RNN``/``LSTM``/``GRU``; see
    ``slimtune.trainers.methods.is_compressible``), in registration order.

    >>> compressible_layers(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.GRU(4, 4)))
    ['0', '2']
    """
    return [name for name, m in model.named_modules() if is_compressible(m)]


def uncompressed_weights(model: nn.Module) -> list[tuple[str, str, int]]:
    """The weight tensors (2-D or more) that no method compresses, because they belong to no
    compressible layer (:func:`compressible_layers`): ``(parameter name, owning module's type,
    values)``, in order. They are stored as float32 (counted in every artifact's size).

    >>> net = nn.Sequential(nn.Bilinear(4, 4, 2), nn.Linear(2, 2))
    >>> uncompressed_weights(net)
    [('0.weight', 'Bilinear', 32)]
    """
    compressible = set(compressible_layers(model))
    found = []
    for module_name, module in model.named_modules():
        if module_name in compressible:
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                name = f"{module_name}.{param_name}" if module_name else param_name
                found.append((name, type(module).__name__, param.numel()))
    return found


def dense_parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters stored as dense fp32: the numerator of the compression ratio."""
    return 4 * sum(p.numel() for p in model.parameters())
