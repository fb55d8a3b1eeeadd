"""Structured pruning of output units: the ``units`` method (knob ``unit_ratio``).

A layer planned with ``unit_ratio < 1`` keeps ``max(1, round(unit_ratio * units))`` of its output
units (rows of a Linear, output channels of a Conv1d/Conv2d): those whose outputs matter most to
the layers that read them, scored ``rms(teacher's input to the consumer) * ||consumer weights
reading the unit||`` summed over the consumers. The dropped units' weights are masked
(:class:`UnitMask`), and so are the consumers' weights that read them (a conv layer feeding a
Linear through a flatten: the Linear's block of inputs per channel); a pruning ratio is then met
among the kept units' weights.

Who reads a unit comes from the model's traced data flow (:func:`unit_groups`): layers whose
outputs meet at an addition (a residual connection) drop the same units, at the largest
``unit_ratio`` planned for any of them; units that anything but a compressed layer reads (the
logits, a layer norm, a concatenation, a layer left out of the plan) all stay.

Example:
    >>> from slimtune.spaces import CompressionPlan, LayerPlan
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> plan = CompressionPlan({"0": LayerPlan(unit_ratio=0.5), "2": LayerPlan()}, kd_alpha=1.0,
    ...                        feature_kd_weight=0.0, lr=1e-3)
    >>> kept, consumers = unit_keeps(model, plan)["0"]
    >>> int(kept.sum()), consumers
    (3, ('2',))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimtune.spaces import UNITS_DECLARATION, CompressionPlan, LayerPlan, Values

from ._base import ApplyContext, CompressionMethod, Mask
from ._graph import unit_groups
from ._layers import weight_tensors
from .lowrank import weight_modules
from .prune import importance


class UnitMask(Mask):
    """The 0/1 mask of a layer's kept units (rows) and of a consumer's inputs that read them (columns)."""


def unit_keeps(model: nn.Module, plan: CompressionPlan, input_rms: dict[str, torch.Tensor] | None = None,
               example_input: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, tuple[str, ...]]]:
    """Which output units each layer of a group planned with ``unit_ratio < 1`` keeps, and the
    layers that read them: ``{layer: (kept units as a bool vector, consumer names)}`` (see the
    module docstring; ``input_rms``: the teacher's root-mean-square input per consumer input, 1
    when not given; ``example_input``: a few inputs, for the ranks the graph does not tell)."""
    keeps: dict[str, tuple[torch.Tensor, tuple[str, ...]]] = {}
    if all(values["unit_ratio"] >= 1 for values in plan.layers.values()):
        return keeps  # nothing to trace for
    groups, _ = unit_groups(model, example_input)
    for group in groups:
        ratios = [plan.layers[p]["unit_ratio"] if p in plan.layers else 1.0 for p in group.producers]
        if (group.blocked_by is not None or not group.consumers or max(ratios) >= 1
                or any(c not in plan.layers for c in group.consumers)):  # a reader outside the plan reads them all
            continue
        score = torch.zeros(group.units)
        for consumer_name in group.consumers:
            consumer = model.get_submodule(consumer_name)
            weight = importance(consumer.weight, (input_rms or {}).get(consumer_name))  # |w| * rms(input)
            per_input = weight.pow(2).transpose(0, 1).flatten(1).sum(dim=1)  # (width,)
            score += per_input.view(group.units, -1).sum(dim=1).cpu()
        kept = torch.zeros(group.units, dtype=torch.bool)
        kept[torch.argsort(score, descending=True, stable=True)[: max(1, round(max(ratios) * group.units))]] = True
        for producer in group.producers:
            keeps[producer] = (kept, tuple(group.consumers))
    return keeps


def allowed_weights(weight: torch.Tensor, rows: torch.Tensor | None, columns: torch.Tensor | None) -> torch.Tensor | None:
    """0/1 tensor shaped like ``weight``: output rows in ``rows`` and inputs in ``columns`` (blocks
    of ``in / len(columns)`` inputs per unit) kept; ``None`` when both are ``None``."""
    if rows is None and columns is None:
        return None
    allowed = torch.ones_like(weight)
    if rows is not None:
        allowed = allowed * rows.to(weight).view((-1,) + (1,) * (weight.dim() - 1))
    if columns is not None:
        cols = columns.to(weight).repeat_interleave(weight.shape[1] // columns.numel())
        allowed = allowed * cols.view((1, -1) + (1,) * (weight.dim() - 2))
    return allowed


class Units(CompressionMethod):
    """Chooses every layer's kept units on the model as it is (``prepare``), then masks the
    dropped units' rows in the layers producing them and their columns in the consumers that are
    compressed too (the first weight module: the first factor of a factorized consumer)."""

    declaration = UNITS_DECLARATION

    def needs_input_rms(self, options: Values, space: Any) -> bool:
        knob = space.knobs["unit_ratio"]
        return knob.fixed != 1.0 or any(v.get("unit_ratio", 1.0) != 1.0 for v in space.overrides.values())

    def prepare(self, model: nn.Module, context: ApplyContext) -> None:
        keeps = unit_keeps(model, context.plan, context.input_rms, context.example_input)
        context.shared["units.keeps"] = keeps
        context.shared["units.read_by"] = {c: kept for kept, consumers in keeps.values() for c in consumers}

    def apply(self, model: nn.Module, name: str, layer: nn.Module, values: LayerPlan,
              context: ApplyContext) -> nn.Module | None:
        keeps = context.shared.get("units.keeps", {})
        read_by = context.shared.get("units.read_by", {})
        if name not in keeps and name not in read_by:
            return None
        modules = weight_modules(layer)
        for position, module in enumerate(modules):
            rows = keeps[name][0] if name in keeps and position == len(modules) - 1 else None
            columns = read_by.get(name) if position == 0 else None
            allowed = allowed_weights(module.weight.detach(), rows, columns)
            if allowed is not None:
                parametrize.register_parametrization(module, "weight", UnitMask(allowed))
        return None

    def inert_layers(self, model: nn.Module, layer_names: list[str],
                     example_input: torch.Tensor | None = None) -> dict[str, set[str]]:
        groups, _ = unit_groups(model, example_input)
        droppable = {p for g in groups if g.blocked_by is None and g.consumers
                     and all(c in layer_names for c in g.consumers) for p in g.producers}
        return {"unit_ratio": set(layer_names) - droppable}

    def achieved(self, layer: nn.Module) -> dict[str, float]:
        module, tensor_name = weight_tensors(layer)[-1]
        last = getattr(module, tensor_name).detach()
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            return {"units": 1.0}  # an attention, recurrent or embedding layer keeps its units
        rows = last.flatten(1).abs().sum(dim=1) > 0
        return {"units": float(rows.float().mean())}
