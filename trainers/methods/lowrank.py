"""Low-rank factorization of a layer by truncated SVD: the ``lowrank`` method (knob ``rank_ratio``).

A ``Linear(in, out)`` with weight ``W`` (out x in) becomes ``Linear(in, r, bias=False)`` with
weight ``sqrt(S_r) V_r^T`` followed by ``Linear(r, out)`` with weight ``U_r sqrt(S_r)`` and the
original bias, where ``W = U S V^T``. A ``Conv2d(in, out, k)`` becomes a ``k x k`` conv to ``r``
channels (same stride, padding, dilation; no bias) followed by a ``1 x 1`` conv to ``out``
channels with the bias; the SVD is of the weight viewed as ``out x (in * kh * kw)``. The rank
is ``r = max(1, round(rank_ratio * min(out, in * kh * kw)))``.

The replacement is a :class:`Factorized` (an ``nn.Sequential`` of the two factors) registered
under the layer's own name, so the layer's output (what forward hooks and feature
distillation see) keeps its name, and ``state_dict`` keys become ``<layer>.0.weight``,
``<layer>.1.weight``, ``<layer>.1.bias``. Pruning and fake quantization then apply to both
factors (see ``apply_plan``). The artifact records ``meta["factorized"] = {layer: rank}``
(:meth:`LowRank.architecture`) so that a loader rebuilds the two thin layers (:meth:`LowRank.rebuild`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(8, 6)
    >>> low = factorize(layer, rank_for(layer, 1.0))
    >>> low.rank, [tuple(m.weight.shape) for m in low]
    (6, [(6, 8), (6, 6)])
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(low(x), layer(x), atol=1e-5)
    True
    >>> rank_for(nn.Conv2d(3, 16, 3), 0.3)  # round(0.3 * min(16, 3 * 3 * 3))
    5
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from slimtune.spaces import LOWRANK_DECLARATION, LayerPlan, SpecError

from ._base import ApplyContext, CompressionMethod

FACTORIZABLE = (nn.Linear, nn.Conv2d)


class Factorized(nn.Sequential):
    """A layer replaced by its two truncated-SVD factors, applied in order; ``rank`` is ``r``."""

    def __init__(self, first: nn.Module, second: nn.Module, rank: int) -> None:
        super().__init__(first, second)
        self.rank = rank

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in * kh * kw)``: the shape of a layer's weight seen as a matrix (from its attributes)."""
    if isinstance(module, Factorized):
        return _matrix_shape(module[1])[0], _matrix_shape(module[0])[1]
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels, module.in_channels // module.groups * kh * kw
    raise TypeError(f"only Linear and Conv2d layers can be factorized, not {type(module).__name__}")


def full_rank(module: nn.Module) -> int:
    """``min(out, in * kh * kw)``: the most singular values a factorization of ``module`` can keep."""
    return min(_matrix_shape(module))


def rank_for(module: nn.Module, rank_ratio: float) -> int:
    """``max(1, round(rank_ratio * min(out, in * kh * kw)))``."""
    if not 0 < rank_ratio <= 1:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
    return max(1, int(round(rank_ratio * full_rank(module))))


def _factors(module: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """The two factor layers of ``module`` at ``rank`` (default-initialized weights)."""
    if not isinstance(module, FACTORIZABLE):
        raise TypeError(f"only Linear and Conv2d layers can be factorized, not {type(module).__name__}")
    if not 1 <= rank <= full_rank(module):
        raise ValueError(f"rank must be in 1..{full_rank(module)} for this layer, got {rank}")
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        return (nn.Linear(module.in_features, rank, bias=False, **factory),
                nn.Linear(rank, module.out_features, bias=has_bias, **factory))
    if module.groups != 1:
        raise ValueError(f"a grouped convolution (groups={module.groups}) cannot be factorized; use rank_ratio = 1")
    first = nn.Conv2d(module.in_channels, rank, module.kernel_size, stride=module.stride, padding=module.padding,
                      dilation=module.dilation, bias=False, padding_mode=module.padding_mode, **factory)
    return first, nn.Conv2d(rank, module.out_channels, 1, bias=has_bias, **factory)


@torch.no_grad()
def factorize(module: nn.Module, rank: int) -> Factorized:
    """``module`` (Linear or Conv2d) as two factors from the truncated SVD of its weight.

    The singular values are split evenly (``sqrt(S)`` into each factor), so both factors have
    weights of similar magnitude for magnitude pruning. At full rank the factors reproduce the
    layer's output up to float rounding.
    """
    first, second = _factors(module, rank)
    weight = module.weight.detach()
    u, s, vh = torch.linalg.svd(weight.flatten(1).to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    first.weight.copy_((root[:, None] * vh[:rank]).reshape(first.weight.shape).to(weight.dtype))
    second.weight.copy_((u[:, :rank] * root[None, :]).reshape(second.weight.shape).to(weight.dtype))
    if module.bias is not None:
        second.bias.copy_(module.bias.detach())
    return Factorized(first, second, rank)


def factorized_shell(module: nn.Module, rank: int) -> Factorized:
    """The architecture of ``factorize(module, rank)`` with placeholder weights (to load a state into)."""
    first, second = _factors(module, rank)
    return Factorized(first, second, rank)


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model``'s submodule ``name`` is (a dotted path)."""
    if not name:
        raise ValueError("the model itself cannot be replaced; wrap a bare layer in nn.Sequential")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def factorized_ranks(model: nn.Module) -> dict[str, int]:
    """``{layer name: rank}`` of every :class:`Factorized` layer of ``model``, in model order."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, Factorized)}


def weight_modules(layer: nn.Module) -> list[nn.Module]:
    """The modules holding a compressible layer's weights: both factors of a factorized layer, or
    the layer itself."""
    return list(layer) if isinstance(layer, Factorized) else [layer]


def _read_by_parent(model: nn.Module, name: str) -> bool:
    """Whether the layer's parent may read its weights directly instead of calling it (the
    ``out_proj`` of ``nn.MultiheadAttention``; the feed-forward layers of a Transformer layer,
    whose fast inference path does): it cannot become two factors."""
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return isinstance(parent, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))


class LowRank(CompressionMethod):
    """``rank_ratio < 1`` replaces a ``Linear``/``Conv2d`` layer by its two truncated-SVD factors
    (applied first, so that the other methods compress both factors); other layers keep full
    rank, and so does a layer its parent may not call (an attention's ``out_proj``, a Transformer
    layer's ``linear1``/``linear2``)."""

    declaration = LOWRANK_DECLARATION

    def apply(self, model: nn.Module, name: str, layer: nn.Module, values: LayerPlan,
              context: ApplyContext) -> nn.Module | None:
        if values["rank_ratio"] >= 1 or not isinstance(layer, FACTORIZABLE) or _read_by_parent(model, name):
            return None  # others keep full rank (see the class docstring)
        return factorize(layer, rank_for(layer, values["rank_ratio"]))

    def inert_layers(self, model: nn.Module, layer_names: list[str],
                     example_input: torch.Tensor | None = None) -> dict[str, set[str]]:
        return {"rank_ratio": {n for n in layer_names
                               if not isinstance(model.get_submodule(n), FACTORIZABLE) or _read_by_parent(model, n)
                               or getattr(model.get_submodule(n), "groups", 1) != 1}}

    def architecture(self, model: nn.Module) -> dict[str, Any]:
        ranks = factorized_ranks(model)
        return {"factorized": ranks} if ranks else {}

    def rebuild(self, model: nn.Module, meta: Mapping[str, Any]) -> None:
        factorized = meta.get("factorized", {})
        if not isinstance(factorized, Mapping):
            raise SpecError("artifact", "meta.factorized", "a table of layer names and ranks", "is unreadable")
        for name, rank in factorized.items():
            try:
                layer = model.get_submodule(name) if isinstance(name, str) and name else None
            except AttributeError:
                layer = None
            if (not isinstance(layer, FACTORIZABLE) or isinstance(rank, bool) or not isinstance(rank, int)
                    or not 1 <= rank <= full_rank(layer)):
                raise SpecError("artifact", f"meta.factorized.{name}", "a Linear/Conv2d layer of the model and a rank "
                                "in 1..min(out, in*kh*kw)", f"does not fit the model (rank {rank!r})")
            replace_submodule(model, name, factorized_shell(layer, rank))

    def achieved(self, layer: nn.Module) -> dict[str, float]:
        if isinstance(layer, (Factorized, *FACTORIZABLE)):
            return {"rank": layer.rank if isinstance(layer, Factorized) else full_rank(layer)}
        weight = next(p for p in layer.parameters() if p.dim() >= 2)  # an attention, recurrent or embedding layer
        return {"rank": min(weight.shape[0], weight[0].numel())}
