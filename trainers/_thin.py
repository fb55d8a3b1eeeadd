"""Removing the units a compressed model no longer uses, so that a deployed layer is thinner.

``unit_ratio`` masks the rows of the units it drops (and the consumers' columns that read
them); the artifact stores those zeros for almost nothing, but an ONNX file or a runtime would
still multiply by them. :func:`thin_units` removes them for real: a unit of a traced
:class:`~slimtune.trainers.methods.UnitGroup` is *idle* when every layer producing it has an
all-zero row for it and every layer reading it an all-zero column (block of columns after a
flatten) for it, so that it adds nothing to anything downstream whatever its bias; idle units
are cut from the producers' weights and biases, the batch norms they pass through and the
consumers' inputs. The model then computes the same outputs (up to the order of float sums)
with thinner ``Linear``/``Conv`` layers. Units that something else reads (the logits, a layer
norm, an attention layer: ``blocked_by``) are never cut.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> with torch.no_grad():
    ...     net[0].weight[3:] = 0; net[2].weight[:, 3:] = 0
    >>> x = torch.randn(5, 4)
    >>> before = net(x)
    >>> {name: index.tolist() for name, index in thin_units(net).items()}
    {'0': [0, 1, 2]}
    >>> net[0], torch.allclose(net(x), before)
    (Linear(in_features=4, out_features=3, bias=True), True)
"""

from __future__ import annotations

import torch
from torch import nn

from .methods import unit_groups


def _rows_zero(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().flatten(1).abs().sum(dim=1) == 0


def _columns_zero(layer: nn.Module, units: int) -> torch.Tensor:
    """Per unit, whether ``layer`` reads nothing of it (its block of inputs is all zero)."""
    weight = layer.weight.detach().abs()
    per_input = weight.transpose(0, 1).flatten(1).sum(dim=1)  # (inputs,)
    return per_input.view(units, -1).sum(dim=1) == 0


def _cut_rows(layer: nn.Module, keep: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[keep].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[keep].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep)
    else:
        layer.out_channels = len(keep)


def _cut_columns(layer: nn.Module, keep: torch.Tensor, units: int) -> None:
    weight = layer.weight.detach()
    block = weight.shape[1] // units
    columns = (keep.view(-1, 1) * block + torch.arange(block).view(1, -1)).flatten()
    layer.weight = nn.Parameter(weight[:, columns].clone())
    if isinstance(layer, nn.Linear):
        layer.in_features = len(columns)
    else:
        layer.in_channels = len(columns)


def _cut_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        if getattr(norm, name, None) is not None:
            setattr(norm, name, nn.Parameter(getattr(norm, name).detach()[keep].clone()))
    for name in ("running_mean", "running_var"):
        if getattr(norm, name, None) is not None:
            setattr(norm, name, getattr(norm, name)[keep].clone())
    norm.num_features = len(keep)


def thin_units(model: nn.Module, example: torch.Tensor | None = None, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Cut every idle unit out of ``model``, in place (see the module docstring); ``example``: a
    few inputs, for the tensor ranks the traced graph does not tell; ``multiple``: keep a multiple
    of that many units per group (the first idle ones fill up). Returns ``{producer layer: the
    indices of the units it kept}`` for the layers it thinned (a group keeps at least one unit)."""
    groups, _ = unit_groups(model, example)
    kept: dict[str, torch.Tensor] = {}
    for group in groups:
        if group.blocked_by is not None or not group.consumers:
            continue
        idle = torch.ones(group.units, dtype=torch.bool)
        for name in group.producers:
            idle &= _rows_zero(model.get_submodule(name))
        for name in dict.fromkeys(group.consumers):
            idle &= _columns_zero(model.get_submodule(name), group.units)
        keep = torch.nonzero(~idle).flatten()
        short = -len(keep) % multiple
        if short:
            keep = torch.sort(torch.cat([keep, torch.nonzero(idle).flatten()[:short]])).values
        if len(keep) == group.units:
            continue
        keep = keep if len(keep) else torch.zeros(1, dtype=torch.long)  # a layer of no width cannot run
        for name in dict.fromkeys(group.producers):
            _cut_rows(model.get_submodule(name), keep)
            kept[name] = keep
        for name in dict.fromkeys(group.norms):
            _cut_norm(model.get_submodule(name), keep)
        for name in dict.fromkeys(group.consumers):
            _cut_columns(model.get_submodule(name), keep, group.units)
    return kept
