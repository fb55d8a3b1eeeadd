"""Folding batch norm into the layer before it, so that the artifact stores what runs.

A ``BatchNorm1d``/``BatchNorm2d`` that reads only the output of a ``Linear``, ``Conv1d`` or
``Conv2d`` (and is the only reader of it) is, in evaluation, an affine map per output channel:
``y = m * (W x + b) + t`` with ``m = gamma / sqrt(var + eps)`` and ``t = beta - m * mean``.
A trial fine-tunes the student with its norms (they adapt to the compressed weights, which is
what makes low bit widths recover), then folds each norm into its layer (:func:`fold_batchnorm`):
the weight rows scale by ``m`` and the bias becomes ``m * b + t``. On a compressed layer the
scaling goes into the tensor the masks and the quantizer read, so masks keep their zeros and a
per-channel quantizer keeps its integer codes (a learned scale moves by ``log |m|``); only the
float16 rounding of the new scales can move a code. The norm becomes an ``nn.Identity``, the
artifact stores no norm statistics and lists the folded norms (``meta["folded_batchnorm"] =
{norm: layer}``) for a loader to rebuild the architecture (:func:`rebuild_folded`), and the
accuracy recorded is the folded model's, read back from the artifact. The layers get a bias
before the fine-tune when they have none (:func:`add_missing_biases`), so that it is trained
and stored as the other biases are.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> net[1].running_mean.uniform_(-1, 1); net[1].running_var.uniform_(0.5, 2)  # doctest: +ELLIPSIS
    tensor(...)
    >>> x = torch.randn(2, 1, 6, 6)
    >>> before = net(x)
    >>> fold_batchnorm(net), type(net[1]).__name__
    ({'1': '0'}, 'Identity')
    >>> torch.allclose(net(x), before, atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.fx import Node
from torch.nn.utils import parametrize

from slimtune.spaces import SpecError

from .methods import FakeQuant, replace_submodule, traced, weight_modules

_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))


def foldable_pairs(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, str]:
    """``{norm: layer}`` for every batch norm that only ever reads one layer's output (which
    nothing else reads), from the model's traced graph; empty when the model cannot be traced. A
    norm after a Linear layer folds only when ``example`` (a few inputs) shows the layer's output
    is 2-D ``(N, features)``: on ``(N, T, F)`` a ``BatchNorm1d`` normalizes ``T``, not the features."""
    if not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules()):
        return {}  # nothing to fold: no trace needed
    graph, ranks, _ = traced(model, example)
    if graph is None:
        return {}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], Node):
            continue
        norm, source = model.get_submodule(str(node.target)), node.args[0]
        if source.op != "call_module" or len(source.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        layer = model.get_submodule(str(source.target))
        if isinstance(layer, nn.Linear) and ranks.get(source) != 2:
            continue
        if (any(isinstance(layer, a) and type(norm) is b for a, b in _PAIRS) and norm.track_running_stats
                and calls[str(node.target)] == 1 and calls[str(source.target)] == 1
                and isinstance(norm.running_mean, torch.Tensor) and norm.num_features == layer.weight.shape[0]):
            pairs[str(node.target)] = str(source.target)
    return pairs


def add_missing_biases(model: nn.Module, pairs: Mapping[str, str]) -> None:
    """Give each layer of ``pairs`` (``{norm: layer}``) a zero bias if it has none (same function)."""
    for layer_name in pairs.values():
        layer = model.get_submodule(layer_name)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                  device=layer.weight.device))


def _source(module: nn.Module, tensor_name: str) -> torch.Tensor:
    """The tensor a module's parametrizations read (the parameter itself when there are none)."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: Mapping[str, str] | None = None) -> dict[str, str]:
    """Fold each batch norm of ``pairs`` (``{norm: layer}``; default :func:`foldable_pairs`) into
    its layer, in place, with the norms' running statistics (evaluation semantics), on a plain or
    a compressed model (see the module docstring); returns the pairs folded."""
    pairs = dict(foldable_pairs(model) if pairs is None else pairs)
    for norm_name, layer_name in pairs.items():
        norm = model.get_submodule(norm_name)
        layer = weight_modules(model.get_submodule(layer_name))[-1]  # a factorized layer's output factor
        scale = norm.running_var.add(norm.eps).rsqrt()
        if norm.affine:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale + (norm.bias if norm.affine else 0)
        weight = _source(layer, "weight")
        weight.mul_(scale.view((-1,) + (1,) * (weight.dim() - 1)))
        if parametrize.is_parametrized(layer, "weight"):
            for step in layer.parametrizations["weight"]:
                if isinstance(step, FakeQuant) and step.learned:
                    step.log_scale.add_(scale.abs().clamp_min(1e-30).log())
        if layer.bias is None:
            layer.bias = nn.Parameter(shift.clone())
        else:
            bias = _source(layer, "bias")
            bias.mul_(scale).add_(shift)
        replace_submodule(model, norm_name, nn.Identity())
    return pairs


def rebuild_folded(model: nn.Module, meta: Mapping[str, Any]) -> None:
    """Give a freshly built model the architecture ``meta["folded_batchnorm"]`` describes: each
    listed norm an ``nn.Identity``, its layer with a bias (``meta`` is data: checked)."""
    folded = meta.get("folded_batchnorm", {})
    if not isinstance(folded, Mapping):
        raise SpecError("artifact", "meta.folded_batchnorm", "a table of norm and layer names", "is unreadable")
    for norm_name, layer_name in folded.items():
        norm, layer = _submodule(model, norm_name), _submodule(model, layer_name)
        if isinstance(norm, nn.Identity) and getattr(layer, "bias", None) is not None:
            continue  # folded already (a folded teacher as the template)
        if (not any(isinstance(layer, a) and type(norm) is b for a, b in _PAIRS)
                or layer.weight.shape[0] != norm.num_features):
            raise SpecError("artifact", f"meta.folded_batchnorm.{norm_name}", "a batch norm of the model and the "
                            "Linear/Conv layer before it", f"does not fit the model (layer {layer_name!r})")
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                  device=layer.weight.device))
        replace_submodule(model, norm_name, nn.Identity())


def _submodule(model: nn.Module, name: Any) -> nn.Module | None:
    try:
        return model.get_submodule(name) if isinstance(name, str) and name else None
    except AttributeError:
        return None
