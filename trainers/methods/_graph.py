"""Which layers' output units can be dropped together, from the model's traced data flow.

Structured pruning must follow the real data dependencies: a unit (output feature of a
``Linear``, output channel of a ``Conv1d``/``Conv2d``) can go only if every layer that reads it
stops reading it, and channels that meet at an addition (a residual connection) are one set of
units, dropped together in every layer that produces them. :func:`unit_groups` traces the model
with ``torch.fx`` (standard ``torch.nn`` modules stay opaque leaves, the user's own modules are
traced through) and follows each layer's output through operations that keep units apart
(activations, dropout, batch norm, pooling, flattening a convolution's channels into blocks of
features, spatial means); additions and multiplications join the units of their operands. A
:class:`UnitGroup` lists the layers producing a set of units and the layers consuming them.
Its units stay when anything else reads them (the model's output, a layer norm, a softmax, a
concatenation, a recurrent or attention layer): ``blocked_by`` says what. A model ``torch.fx``
cannot trace (data-dependent control flow) drops no units; :func:`unit_groups` says why.

Inside ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer`` (opaque to the trace),
the feed-forward pair ``linear1 -> activation -> linear2`` is a group of its own.

Example:
    >>> from torch import nn
    >>> class Residual(nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.stem, self.conv = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    ...         self.head = nn.Linear(4 * 8 * 8, 3)
    ...     def forward(self, x):
    ...         x = self.stem(x)
    ...         return self.head((x + self.conv(torch.relu(x))).flatten(1))
    >>> groups, reason = unit_groups(Residual())
    >>> [(g.producers, g.consumers, g.blocked_by) for g in groups]
    [(['stem', 'conv'], ['conv', 'head'], None), (['head'], [], "the model's output")]
"""

from __future__ import annotations

import contextlib
import io
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

MODEL_OUTPUT = "the model's output"  # why the logits keep every unit
CHANNELS, FEATURES, FLAT = "channels", "features", "flat"  # where a tensor's units lie: dim 1, last dim, blocks of dim 1

_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                  nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_UNARY_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                    F.leaky_relu, F.elu, F.hardswish, F.mish, F.softplus, F.dropout, F.dropout1d, F.dropout2d}
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "relu_"}
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d}
_JOIN_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, torch.add, torch.sub,
                   torch.mul}
_JOIN_METHODS = {"add", "add_", "sub", "mul", "mul_"}
_SHAPE_METHODS = {"size", "dim"}  # results are not tensors: reading them reads no unit


@dataclass
class UnitGroup:
    """One set of units: the layers producing them (rows), those reading them (inputs), their
    count, what keeps them all (``None``: they can be dropped), and the batch norms they pass
    through (``norms``: one value per unit each, thinned with them)."""

    producers: list[str]
    consumers: list[str] = field(default_factory=list)
    units: int = 0
    blocked_by: str | None = None
    norms: list[str] = field(default_factory=list)


@dataclass
class _Flow:
    group: int
    layout: str
    rank: int | None = None  # the tensor's number of dimensions, when known


class _Groups:
    """Union-find over groups of units (why written here: ``torch.fx`` has the graph, not this relation)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.data: list[UnitGroup] = []
        self.made_by: dict[str, list[int]] = {}

    def new(self, producer: str, units: int) -> int:
        self.parent.append(len(self.parent))
        self.data.append(UnitGroup([producer], units=units))
        group = len(self.parent) - 1
        earlier = self.made_by.setdefault(producer, [])
        earlier.append(group)
        if len(earlier) > 1:  # a layer called twice: one row mask cannot serve two sets of units
            for each in earlier:
                self.block(each, f"{producer} is called more than once")
        return group

    def root(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def block(self, group: int, reason: str) -> None:
        data = self.data[self.root(group)]
        data.blocked_by = data.blocked_by or reason

    def join(self, a: int, b: int) -> int:
        a, b = self.root(a), self.root(b)
        if a != b:
            first, second = self.data[a], self.data[b]
            first.producers += second.producers
            first.consumers += second.consumers
            first.norms += second.norms
            if first.units != second.units:
                first.blocked_by = first.blocked_by or "layers of different widths meet"
            first.blocked_by = first.blocked_by or second.blocked_by
            self.parent[b] = a
        return a

    def result(self) -> list[UnitGroup]:
        return [self.data[g] for g in range(len(self.parent)) if self.root(g) == g]


def _width(module: nn.Module) -> tuple[int, int]:
    """``(input units, output units)`` of a Linear or Conv layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels  # type: ignore[return-value]


def _dims(node: fx.Node) -> tuple[Any, bool]:
    """The reduced dimensions and ``keepdim`` of a ``mean``/``sum``/``amax`` node."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return dims, bool(keep)


def traced(model: nn.Module, example: torch.Tensor | None = None) -> tuple[fx.Graph | None, dict[fx.Node, int], str]:
    """The model's ``torch.fx`` graph (``None`` and why, when it cannot be traced) and, with an
    ``example`` input, each node's number of dimensions (``ShapeProp``)."""
    try:
        graph = fx.Tracer().trace(model)
    except Exception as error:  # fx raises many types for what it cannot follow
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return None, {}, f"torch.fx cannot trace the model's forward ({type(error).__name__}: {first_line[:160]})"
    ranks: dict[fx.Node, int] = {}
    if example is not None:
        was_training = model.training
        try:  # ShapeProp prints a failing node's traceback itself: keep it off the user's screen
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                ShapeProp(fx.GraphModule(model, graph)).propagate(example)
            for node in graph.nodes:
                meta = node.meta.get("tensor_meta")
                if meta is not None and hasattr(meta, "shape"):
                    ranks[node] = len(meta.shape)
        except Exception:  # shapes are a help, not a need: without them, unknown ranks block
            ranks = {}
        finally:
            model.train(was_training)
    return graph, ranks, ""


def unit_groups(model: nn.Module, example: torch.Tensor | None = None) -> tuple[list[UnitGroup], str | None]:
    """The model's groups of units (see the module docstring), and why there are none when the
    model cannot be traced (``None`` otherwise). ``example`` (a few inputs) tells the ranks of
    tensors the graph alone does not (a Linear layer's output), which lets a batch norm or a
    flatten after a Linear layer pass its units."""
    graph, ranks, why = traced(model, example)
    if graph is None:
        return [], why
    groups = _Groups()
    flows: dict[fx.Node, _Flow | None] = {}

    def flow(value: Any) -> _Flow | None:
        return flows.get(value) if isinstance(value, fx.Node) else None

    def block_all(values: Any, reason: str) -> None:
        for value in _nodes(values):
            found = flow(value)
            if found is not None:
                groups.block(found.group, reason)

    for node in graph.nodes:
        out: _Flow | None = None
        first = flow(node.args[0]) if node.args else None
        rest = (node.args[1:], node.kwargs)
        if node.op == "call_module":
            module = model.get_submodule(str(node.target))
            out = _through_module(str(node.target), module, first, groups, ranks.get(node))
            if out is None and first is not None and not _consumes(module):
                groups.block(first.group, f"{type(module).__name__} {node.target} reads them")
            block_all(rest, f"{node.target} reads them as an extra input")
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            if node.target in _JOIN_FUNCTIONS or (node.op == "call_method" and node.target in _JOIN_METHODS):
                out = _join(node, flows, groups)
            elif node.op == "call_method" and node.target in _SHAPE_METHODS or node.target is getattr:
                out = None
            elif first is not None and (after := _through_function(node, first)) is not None:
                out = after
                block_all(rest, f"{name} reads them as an extra input")
            else:
                block_all((node.args, node.kwargs), f"{name} reads them")
        elif node.op == "output":
            block_all(node.args, MODEL_OUTPUT)
        flows[node] = out
    found = groups.result()
    reading: dict[str, list[UnitGroup]] = {}
    for group in found:
        for name in dict.fromkeys(group.consumers):
            reading.setdefault(name, []).append(group)
    for name, read in reading.items():
        if len(read) > 1:  # one column mask cannot serve two sets of units
            for group in read:
                group.blocked_by = group.blocked_by or f"{name} also reads other units"
    for group in found:
        for name in group.consumers:
            width = _width(model.get_submodule(name))[0]
            if width % group.units or (not isinstance(model.get_submodule(name), nn.Linear) and width != group.units):
                group.blocked_by = group.blocked_by or f"{name} reads them in another shape"
    for name, module in model.named_modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            found.append(UnitGroup([f"{name}.linear1"], [f"{name}.linear2"], module.linear1.out_features))
    return found, None


def _nodes(values: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(values, out.append)
    return out


def _consumes(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and getattr(module, "groups", 1) == 1


def _through_module(name: str, module: nn.Module, first: _Flow | None, groups: _Groups,
                    rank: int | None) -> _Flow | None:
    """The flow out of a leaf module: a new group for a layer (which consumes its input's units),
    the input's flow through a module that keeps units apart, else ``None``. ``rank``: the
    output's number of dimensions, when known."""
    if _consumes(module):
        if first is not None:
            linear = isinstance(module, nn.Linear)
            if (first.layout == CHANNELS) == linear:  # a Linear reads features, a conv reads channels
                groups.block(first.group, f"{name} reads them along another dimension")
            else:
                groups.data[groups.root(first.group)].consumers.append(name)
        if isinstance(module, nn.Linear):
            known = rank if rank is not None else (first.rank if first is not None else None)
            return _Flow(groups.new(name, _width(module)[1]), FEATURES, known)
        return _Flow(groups.new(name, _width(module)[1]), CHANNELS, 3 if isinstance(module, nn.Conv1d) else 4)
    if first is None:
        return None
    if isinstance(module, _UNARY_MODULES):
        return first
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and (
            first.layout == CHANNELS or (first.layout == FEATURES and first.rank == 2)):
        groups.data[groups.root(first.group)].norms.append(name)
        return first  # over a Linear layer's output, a norm reads its features only when it is 2-D
    if isinstance(module, _POOL_MODULES) and first.layout == CHANNELS:
        return first
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return _flattened(first)
    return None


def _flattened(first: _Flow) -> _Flow | None:
    """``x.flatten(1)``: a conv's channels become blocks of features; a 2-D tensor stays as it is."""
    if first.layout == CHANNELS:
        return _Flow(first.group, FLAT, 2)
    return first if first.rank == 2 else None


def _through_function(node: fx.Node, first: _Flow) -> _Flow | None:
    """The flow out of a function or method node that passes its first argument's units through,
    apart (``None``: it mixes them, or it is not known to keep them apart)."""
    target = node.target
    if target in _UNARY_FUNCTIONS or (node.op == "call_method" and target in _UNARY_METHODS):
        return first
    if target in _POOL_FUNCTIONS:
        return first if first.layout == CHANNELS else None
    if target in (torch.flatten, "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return _flattened(first) if start == 1 and end == -1 else None
    if target in ("view", "reshape", torch.reshape):  # x.view(x.size(0), -1): channels into blocks
        shape = node.args[1:] if len(node.args) > 1 and not isinstance(node.args[1], (tuple, list)) else (
            tuple(node.args[1]) if len(node.args) > 1 else ())
        return _Flow(first.group, FLAT, 2) if first.layout == CHANNELS and len(shape) == 2 and shape[1] == -1 else None
    if target in ("mean", "sum", "amax", torch.mean, torch.sum, torch.amax):
        return _reduced(node, first)
    return None


def _reduced(node: fx.Node, first: _Flow) -> _Flow | None:
    """A mean, sum or max over dimensions of a conv's output: over every spatial dimension it
    leaves ``(N, C)`` (or ``(N, C, 1, 1)`` with ``keepdim``); over some of them it keeps the
    channels, with ``keepdim`` only (without, a Linear layer would read positions, not channels)."""
    if first.layout != CHANNELS or first.rank is None:
        return None
    dims, keep = _dims(node)
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    reduced = {d % first.rank for d in dims}
    if not reduced <= set(range(2, first.rank)):
        return None  # the batch or the channels themselves
    if keep:
        return first
    return _Flow(first.group, FLAT, 2) if reduced == set(range(2, first.rank)) else None


def _join(node: fx.Node, flows: dict[fx.Node, _Flow | None], groups: _Groups) -> _Flow | None:
    """An addition or product: the units of every tensor operand become one group."""
    operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    tracked = [flows.get(a) for a in operands]
    present = [f for f in tracked if f is not None]
    if not present:
        return None
    if len(present) != len(tracked) or len({f.layout for f in present}) > 1:
        for f in present:
            groups.block(f.group, "they meet a tensor no layer of theirs produces")
        return None
    group = present[0].group
    for other in present[1:]:
        group = groups.join(group, other.group)
    return _Flow(group, present[0].layout, present[0].rank)
