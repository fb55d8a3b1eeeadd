"""Structured pruning of output units: the ``units`` method (knob ``unit_ratio``).

A layer planned with ``unit_ratio < 1`` keeps ``max(1, round(unit_ratio * units))`` of its output
units (rows of a Linear, output channels of a Conv2d): those whose outputs matter most to the
layer that reads them, scored ``rms(teacher's input to the consumer) * ||consumer weights reading
the unit||``. The dropped units' weights are masked (:class:`UnitMask`), and so are the
consumer's weights that read them (a conv layer feeding a Linear through a flatten: the Linear's
block of inputs per channel); a pruning ratio is then met among the kept units' weights.

The consumer is the next ``Linear``/``Conv2d`` in registration order whose input width is a
multiple of the layer's units (the data flow of a chain: MLPs, LeNets, VGG-style nets); a layer
no next layer reads that way (the logits) keeps every unit.

Example:
    >>> from slimtune.spaces import CompressionPlan, LayerPlan
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> plan = CompressionPlan({"0": LayerPlan(unit_ratio=0.5), "2": LayerPlan()}, kd_alpha=1.0,
    ...                        feature_kd_weight=0.0, lr=1e-3)
    >>> kept, consumer = unit_keeps(model, plan)["0"]
    >>> int(kept.sum()), consumer
    (3, '2')
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimtune.spaces import UNITS_DECLARATION, CompressionPlan, LayerPlan, Values

from .lowrank import weight_modules
from ._base import ApplyContext, CompressionMethod, Mask
from .prune import importance


class UnitMask(Mask):
    """The 0/1 mask of a layer's kept units (rows) and of a consumer's inputs that read them (columns)."""


def _input_width(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels  # type: ignore[return-value]


def unit_keeps(model: nn.Module, plan: CompressionPlan,
               input_rms: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, str]]:
    """Which output units each layer planned with ``unit_ratio < 1`` keeps, and the layer that
    reads them: ``{layer: (kept units as a bool vector, consumer name)}`` (see the module docstring;
    ``input_rms``: the teacher's root-mean-square input per consumer input, 1 when not given)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    keeps: dict[str, tuple[torch.Tensor, str]] = {}
    for name, layer_plan in plan.layers.items():
        if layer_plan["unit_ratio"] >= 1 or name not in names or names.index(name) + 1 >= len(names):
            continue
        producer, consumer_name = model.get_submodule(name), names[names.index(name) + 1]
        consumer = model.get_submodule(consumer_name)
        units = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
        width = _input_width(consumer)
        if width % units or (isinstance(consumer, nn.Conv2d) and (width != units or consumer.groups != 1)):
            continue
        weight = importance(consumer.weight, (input_rms or {}).get(consumer_name))  # |w| * rms(input)
        per_input = weight.pow(2).transpose(0, 1).flatten(1).sum(dim=1)  # (width,)
        score = per_input.view(units, -1).sum(dim=1)
        kept = torch.zeros(units, dtype=torch.bool)
        kept[torch.argsort(score, descending=True, stable=True)[: max(1, round(layer_plan["unit_ratio"] * units))]] = True
        keeps[name] = (kept, consumer_name)
    return keeps


def allowed_weights(weight: torch.Tensor, rows: torch.Tensor | None, columns: torch.Tensor | None) -> torch.Tensor | None:
    """0/1 tensor shaped like ``weight``: output rows in ``rows`` and inputs in ``columns`` (blocks
    of ``in / len(columns)`` inputs per unit) kept; ``None`` when both are ``None``."""
    if rows is None and columns is None:
        return None
    allowed = torch.ones_like(weight)
    if rows is not None:
        allowed = allowed * rows.to(weight.dtype).view((-1,) + (1,) * (weight.dim() - 1))
    if columns is not None:
        cols = columns.to(weight.dtype).repeat_interleave(weight.shape[1] // columns.numel())
        allowed = allowed * cols.view((1, -1) + (1,) * (weight.dim() - 2))
    return allowed


class Units(CompressionMethod):
    """Chooses every layer's kept units on the model as it is (``prepare``), then masks the
    dropped units' rows in the layer and their columns in its consumer, when the consumer is
    compressed too (its first weight module: the first factor of a factorized consumer)."""

    declaration = UNITS_DECLARATION

    def needs_input_rms(self, options: Values, space: Any) -> bool:
        knob = space.knobs["unit_ratio"]
        return knob.fixed != 1.0 or any(v.get("unit_ratio", 1.0) != 1.0 for v in space.overrides.values())

    def prepare(self, model: nn.Module, context: ApplyContext) -> None:
        keeps = unit_keeps(model, context.plan, context.input_rms)
        context.shared["units.keeps"] = keeps
        context.shared["units.read_by"] = {consumer: kept for kept, consumer in keeps.values()}

    def apply(self, model: nn.Module, name: str, layer: nn.Module, values: LayerPlan,
              context: ApplyContext) -> nn.Module | None:
        keeps = context.shared.get("units.keeps", {})
        read_by = context.shared.get("units.read_by", {})
        modules = weight_modules(layer)
        for position, module in enumerate(modules):
            rows = keeps[name][0] if name in keeps and position == len(modules) - 1 else None
            columns = read_by.get(name) if position == 0 else None
            allowed = allowed_weights(module.weight.detach(), rows, columns)
            if allowed is not None:
                parametrize.register_parametrization(module, "weight", UnitMask(allowed))
        return None

    def achieved(self, layer: nn.Module) -> dict[str, float]:
        last = weight_modules(layer)[-1].weight.detach()
        rows = last.flatten(1).abs().sum(dim=1) > 0
        return {"units": float(rows.float().mean())}
