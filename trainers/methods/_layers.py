"""Which modules the methods compress, and which of their tensors: the weights and biases of
every layer kind a method can reach.

A *compressible layer* is a ``Linear``, ``Conv1d``, ``Conv2d``, ``Embedding``,
``MultiheadAttention`` (its packed ``in_proj_weight``, or ``q/k/v_proj_weight`` when the key and
value widths differ; ``out_proj`` is a ``Linear`` layer of its own) or recurrent layer (``RNN``,
``LSTM``, ``GRU``: every ``weight_ih_l*``, ``weight_hh_l*``, ``weight_hr_l*``). Pruning and
quantization reach all of their weight tensors; low rank and unit pruning reach ``Linear`` and
``Conv2d`` (units also ``Conv1d``). LayerNorm, BatchNorm and other one-dimensional tensors are
stored as they are and counted in every artifact.

Example:
    >>> from torch import nn
    >>> [name for _, name in weight_tensors(nn.GRU(4, 3))]
    ['weight_ih_l0', 'weight_hh_l0']
    >>> [name for _, name in weight_tensors(nn.MultiheadAttention(8, 2))]
    ['in_proj_weight']
    >>> [name for _, name in bias_tensors(nn.MultiheadAttention(8, 2))]
    ['in_proj_bias']
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from .lowrank import Factorized

COMPRESSIBLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.MultiheadAttention,
                                             nn.RNNBase)


def is_compressible(module: nn.Module) -> bool:
    """Whether ``module`` is a layer the methods compress (see the module docstring)."""
    return isinstance(module, COMPRESSIBLE)


def weight_tensors(layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, tensor name)`` of each weight matrix of a compressible layer: both factors of a
    factorized one, the attention's input projections, a recurrent layer's matrices, else ``weight``."""
    if isinstance(layer, Factorized):
        return [(module, "weight") for module in layer]
    if isinstance(layer, nn.MultiheadAttention):
        names = (["in_proj_weight"] if layer._qkv_same_embed_dim
                 else ["q_proj_weight", "k_proj_weight", "v_proj_weight"])
        return [(layer, name) for name in names]
    if isinstance(layer, nn.RNNBase):
        return [(layer, name) for name in layer._flat_weights_names if name.startswith("weight_")]
    return [(layer, "weight")]


def bias_tensors(layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, tensor name)`` of each bias vector of a compressible layer that has one."""
    if isinstance(layer, Factorized):
        return [(module, "bias") for module in layer if getattr(module, "bias", None) is not None]
    if isinstance(layer, nn.MultiheadAttention):
        return [(layer, "in_proj_bias")] if layer.in_proj_bias is not None else []
    if isinstance(layer, nn.RNNBase):
        return [(layer, name) for name in layer._flat_weights_names if name.startswith("bias_")]
    return [(layer, "bias")] if getattr(layer, "bias", None) is not None else []


def register_parametrization(module: nn.Module, tensor_name: str, parametrization: nn.Module) -> None:
    """``torch.nn.utils.parametrize.register_parametrization``, and for a recurrent layer a
    forward hook that drops the computed weights it keeps after each pass (``_flat_weights``,
    re-read at the next pass), so that the layer can still be deep-copied (averaged weights)."""
    parametrize.register_parametrization(module, tensor_name, parametrization)
    if isinstance(module, nn.RNNBase) and not getattr(module, "_slimtune_forgets", False):
        module.register_forward_hook(_forget_flat_weights)
        module._slimtune_forgets = True


def _forget_flat_weights(module: nn.Module, args: Any, output: Any) -> None:
    if parametrize.is_parametrized(module):  # once baked, its weights are parameters again: keep them
        module._flat_weights = [None] * len(module._flat_weights_names)
