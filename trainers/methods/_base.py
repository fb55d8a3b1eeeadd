"""The protocol every compression method implements, and the registry that the trial iterates.

A method is the tensor side of a :class:`~slimtune.spaces.Declaration` (its knobs, options and
stats, plain data in ``slimtune.spaces``). In the spirit of torch's ``BaseSparsifier`` (prepare,
update, squash) and Optuna's ``BaseSampler`` (a small abstract protocol chosen by name), a method:

- :meth:`~CompressionMethod.prepare`\\ s the whole model once (e.g. chooses which units to keep
  from the next layers' weights) and :meth:`~CompressionMethod.apply`\\ s itself to one layer,
  as ``torch.nn.utils.parametrize`` parametrizations or by replacing the layer;
- contributes Lightning :meth:`~CompressionMethod.callbacks` to the fine-tune (mask schedules);
- encodes and decodes its share of the artifact (:meth:`~CompressionMethod.codecs`: the entry
  kinds it writes, for the parametrizations it registers), and states the architecture a loader
  must rebuild (:meth:`~CompressionMethod.architecture`, :meth:`~CompressionMethod.rebuild`);
- reports what it :meth:`~CompressionMethod.achieved` on a layer (sparsity, bits, rank, units).

Adding a method is one module with a subclass and one line, :func:`register_method`.

Example (a toy method that clips each weight to a share of its largest magnitude)::

    from slimtune.spaces import Declaration, KnobDeclaration

    class Clip(CompressionMethod):
        declaration = Declaration("clip", "clip weights", knobs=(KnobDeclaration(
            "clip_ratio", "float", {"fixed": 1.0}, 0.0, 1.0, low_open=True, neutral=1.0,
            allowed_text="a share of the largest magnitude in (0, 1]"),))

        def apply(self, model, name, layer, values, context):
            if values["clip_ratio"] < 1:
                for module, tensor_name in weight_tensors(layer):
                    parametrize.register_parametrization(module, tensor_name, ClipTo(values["clip_ratio"]))
            return None

    register_method(Clip())
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from slimtune.spaces import CompressionPlan, Declaration, LayerPlan, Values, register_declaration

Blocks = list[bytes]


@dataclass
class ApplyContext:
    """What :meth:`CompressionMethod.prepare` and ``apply`` may use: the plan, each method's
    options (``options("prune").activation_power``), the teacher's root-mean-square input per
    layer and input feature or channel (``input_rms``; ``None`` unless a method asked for it),
    the layer producing the logits, ``shared``: a scratch dict methods fill in ``prepare``, and
    ``example_input``: a few of the data's inputs, when the caller has them."""

    plan: CompressionPlan
    method_options: Mapping[str, Values] = field(default_factory=dict)
    input_rms: dict[str, torch.Tensor] | None = None
    output_layer: str | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    example_input: torch.Tensor | None = None  # a few of the data's inputs (tensor ranks for tracing), if known

    def options(self, method: str) -> Values:
        """The options of ``method`` (``apply_plan`` fills in every method's)."""
        return self.method_options[method]


@dataclass
class FitContext:
    """What :meth:`CompressionMethod.callbacks` may use: the student, the fine-tune's base epochs
    and training batches per epoch, and the method's options."""

    student: nn.Module
    epochs: int
    steps_per_epoch: int
    options: Values


@dataclass(frozen=True)
class Codec:
    """How entries of ``kind`` are written and read: ``encode(parametrization, value)`` gives the
    entry's fields and blocks for a tensor whose last parametrization is one of ``writes``
    (``value``: the tensor as it enters that parametrization); ``decode(entry, blocks, count,
    shape, version)`` gives the tensor back; ``codes`` (same arguments), for a kind that stores
    integers (its entries carry ``bits``), gives them and their per-output-channel scales (what an
    integer ONNX export writes)."""

    kind: str
    writes: tuple[type, ...]
    encode: Callable[[nn.Module, torch.Tensor], tuple[dict[str, Any], Blocks]]
    decode: Callable[[dict[str, Any], Blocks, int, tuple[int, ...], int], torch.Tensor]
    blocks: Callable[[dict[str, Any]], int]  # how many blocks an entry of this kind has
    check: Callable[[dict[str, Any], tuple[int, ...]], None] = lambda entry, shape: None
    codes: Callable[[dict[str, Any], Blocks, int, tuple[int, ...], int], tuple[torch.Tensor, torch.Tensor]] | None = None


class CompressionMethod:
    """The tensor side of one method (see the module docstring). Every hook has a default that
    does nothing, so a method overrides only what it does."""

    declaration: Declaration

    @property
    def name(self) -> str:
        return self.declaration.name

    def needs_input_rms(self, options: Values, space: Any) -> bool:
        """Whether ``prepare``/``apply`` read the teacher's input statistics (``ApplyContext.input_rms``)."""
        return False

    def prepare(self, model: nn.Module, context: ApplyContext) -> None:
        """Whole-model work before any layer changes."""

    def apply(self, model: nn.Module, name: str, layer: nn.Module, values: LayerPlan,
              context: ApplyContext) -> nn.Module | None:
        """Compress one layer in place (parametrizations), or return a module to replace it with."""
        return None

    def callbacks(self, context: FitContext) -> list[pl.Callback]:
        """Lightning callbacks for the student's fine-tune."""
        return []

    def codecs(self) -> list[Codec]:
        """The artifact entry kinds this method writes and reads."""
        return []

    def architecture(self, model: nn.Module) -> dict[str, Any]:
        """What a loader needs beside the weights to rebuild what this method changed (``meta`` keys)."""
        return {}

    def rebuild(self, model: nn.Module, meta: Mapping[str, Any]) -> None:
        """Change a freshly built model as :meth:`architecture`'s ``meta`` says (data: checked)."""

    def achieved(self, layer: nn.Module) -> dict[str, float]:
        """What the method achieved on one compressed layer (its declared stats)."""
        return {}

    def inert_layers(self, model: nn.Module, layer_names: list[str],
                     example_input: torch.Tensor | None = None) -> dict[str, set[str]]:
        """``{knob: layers}``: the layers of ``layer_names`` where a knob of this method can change
        nothing (the sampler leaves it at its neutral value there); ``example_input``: a few inputs."""
        return {}


_METHODS: dict[str, CompressionMethod] = {}


def register_method(method: CompressionMethod) -> CompressionMethod:
    """Register a method (its declaration too, so specs can search its knobs); methods apply in
    registration order, after the built-in ones. Returns the method."""
    if not isinstance(getattr(method, "declaration", None), Declaration):
        raise TypeError(f"{type(method).__name__} has no declaration (a slimtune.spaces.Declaration)")
    register_declaration(method.declaration)
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method registered with :func:`register_method` (built-ins stay)."""
    from slimtune.spaces import BUILT_IN, unregister_declaration

    if name in BUILT_IN:
        raise ValueError(f"{name!r} is built in")
    _METHODS.pop(name, None)
    unregister_declaration(name)


def methods() -> list[CompressionMethod]:
    """The registered methods, in the order they apply."""
    return list(_METHODS.values())


def method(name: str) -> CompressionMethod:
    return _METHODS[name]


def straight_through(value: torch.Tensor, gradient_of: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, bit for bit, with the gradient of ``gradient_of``."""
    return value.detach() + (gradient_of - gradient_of.detach())


class Mask(nn.Module):
    """Parametrization multiplying a weight by a fixed 0/1 ``mask`` (a buffer, kept in
    ``state_dict``). Methods that prune register subclasses; a later method treats the weights a
    mask already zeroes as pruned (:func:`masked_before`)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def masked_before(module: nn.Module, tensor_name: str = "weight") -> torch.Tensor | None:
    """The product of the :class:`Mask` parametrizations already on ``module.<tensor_name>`` (``None``: none)."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(module, tensor_name):
        return None
    masks = [p.mask for p in module.parametrizations[tensor_name] if isinstance(p, Mask)]
    if not masks:
        return None
    product = masks[0].clone()
    for mask in masks[1:]:
        product = product * mask
    return product
