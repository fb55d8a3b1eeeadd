"""Unstructured pruning: the ``prune`` method (knob ``prune_ratio``, options ``[method.prune]``).

A layer's mask zeroes exactly ``round(prune_ratio * numel)`` of its weights: those with the
lowest score ``|w| * rms(x) ** p``, ``rms(x)`` being the teacher's root-mean-square input to that
weight (input feature, or input channel of a convolution) on the training data and ``p`` the
option ``activation_power`` (0: plain magnitude pruning; 1: Wanda's score, Sun et al. 2023).
Weights an earlier method already masked (the dropped units of ``unit_ratio``) stay pruned and
count towards the ratio.

When the masks are chosen is the option ``schedule``:

- ``"oneshot"``: before the first step;
- ``"gradual"``: the sparsity grows from 0 to the planned ratio along the cubic ramp of Zhu &
  Gupta (2017) over the first ``ramp`` share of the fine-tune's steps (:class:`GradualPruning`);
- ``"dynamic"``: the planned ratio from the start, the masks re-chosen every few steps with
  straight-through gradients, so pruned weights can grow back (network surgery, Guo et al.
  2016), during the first ``ramp`` share, then frozen (:class:`DynamicPruning`).

Example:
    >>> cubic_sparsity(0.9, step=0, ramp_steps=100), cubic_sparsity(0.9, step=50, ramp_steps=100)
    (0.0, 0.7875)
    >>> layer = nn.Linear(3, 1)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[0.5, 0.2, 0.3]]))
    >>> x = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])  # input 0 is always zero
    >>> scales = layer_input_scales(nn.Sequential(layer), ["0"], x, power=1.0)
    >>> scales["0"], importance(layer.weight, scales["0"])
    (tensor([0., 1., 1.]), tensor([[0.0000, 0.2000, 0.3000]]))
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL
from torch.nn.utils import parametrize

from slimtune.spaces import PRUNE_DECLARATION, LayerPlan, Values

from ._layers import register_parametrization, weight_tensors
from ._base import ApplyContext, CompressionMethod, FitContext, Mask, masked_before, straight_through


def magnitude_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """A 0/1 mask (weight's dtype) zeroing exactly ``round(ratio * numel)`` smallest-magnitude weights."""
    numel = weight.numel()
    k = int(round(ratio * numel))
    mask = torch.ones(numel, dtype=weight.dtype, device=weight.device)
    if k > 0:
        order = torch.argsort(weight.detach().abs().flatten(), stable=True)
        mask[order[:k]] = 0
    return mask.view_as(weight)


def allowed_mask(score: torch.Tensor, ratio: float, allowed: torch.Tensor | None) -> torch.Tensor:
    """:func:`magnitude_mask` of ``score`` that also zeroes every position where ``allowed`` is 0
    (then at least ``round(ratio * numel)`` zeros).

    >>> allowed_mask(torch.tensor([[3.0, 1.0], [2.0, 4.0]]), 0.25, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    tensor([[1., 1.],
            [0., 0.]])
    """
    if allowed is None:
        return magnitude_mask(score, ratio)
    return magnitude_mask(score * allowed, ratio) * allowed


def layer_input_scales(model: nn.Module, layer_names: list[str], inputs: torch.Tensor, power: float,
                       chunk: int = 1000) -> dict[str, torch.Tensor]:
    """``rms(input) ** power`` per input feature or channel of each layer, over ``inputs``.

    Layers other than ``Linear`` and ungrouped ``Conv1d``/``Conv2d`` are left out (their masks
    stay magnitude masks), and so are layers the forward pass never calls as modules.
    """
    squares: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def tap(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0].detach().float()
            if isinstance(module, nn.Linear):  # features along the last dimension, any leading ones
                per_feature = x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)
            else:  # a convolution: channels along dimension 1
                per_feature = x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).sum(dim=1)
            squares[name] = squares.get(name, 0) + per_feature
            counts[name] = counts.get(name, 0) + x.numel() // per_feature.numel()
        return hook

    handles = []
    for name in layer_names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear) or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1):
            handles.append(module.register_forward_hook(tap(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), chunk):
                model(inputs[start: start + chunk])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: (squares[name] / counts[name]).sqrt().pow(power) for name in squares}


def importance(weight: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """``|weight|``, times ``input_scale`` along the input dimension when it fits that dimension."""
    score = weight.detach().abs()
    if input_scale is None or weight.dim() < 2 or weight.shape[1] != input_scale.numel():
        return score
    return score * input_scale.view((1, -1) + (1,) * (weight.dim() - 2)).to(score)


class PruneMask(Mask):
    """The pruning mask of one weight. With ``straight_through`` set, the gradient reaches pruned
    weights too (as if the mask were not there), so that a schedule re-choosing the mask can let
    them grow back. ``input_scale`` weights the magnitudes whenever the mask is chosen again
    (:meth:`reselect`); ``allowed`` (0/1: what earlier masks left) bounds every choice."""

    def __init__(self, mask: torch.Tensor, input_scale: torch.Tensor | None = None,
                 allowed: torch.Tensor | None = None) -> None:
        super().__init__(mask)
        self.straight_through = False
        self.input_scale = input_scale
        self.allowed = allowed

    def reselect(self, weight: torch.Tensor, ratio: float) -> None:
        """Keep the ``1 - ratio`` share of ``weight`` with the highest importance (never a
        weight outside ``allowed``)."""
        allowed = self.allowed.to(weight) if self.allowed is not None else None  # plain attributes: not moved
        self.mask.copy_(allowed_mask(importance(weight, self.input_scale), ratio, allowed))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        masked = weight * self.mask
        return straight_through(masked, weight) if self.straight_through else masked


def cubic_sparsity(target: float, step: int, ramp_steps: int) -> float:
    """The sparsity at ``step`` of a cubic ramp reaching ``target`` after ``ramp_steps``: torch's
    own formula (``torch.ao.pruning``'s ``CubicSL``, Zhu & Gupta 2017), from 0. Its scheduler
    drives a ``BaseSparsifier``; our masks are parametrizations scored by ``|w| * rms(x)^p``
    within what earlier masks allow, which no built-in sparsifier does, so we call the formula."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return target
    return float(CubicSL.sparsity_compute_fn(s_0=0.0, s_f=target, t=step, t_0=0, dt=1, n=ramp_steps))


def pruned_weights(model: nn.Module) -> list[tuple[Any, PruneMask, float]]:
    """``(parametrization list, mask, planned ratio)`` for every tensor carrying a :class:`PruneMask`
    (the list's ``original`` is the tensor the mask is chosen from)."""
    found = []
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for chain in module.parametrizations.values():
                for p in chain:
                    if isinstance(p, PruneMask):
                        found.append((chain, p, float((p.mask == 0).sum()) / p.mask.numel()))
    return found


class GradualPruning(pl.Callback):
    """Grow the pruning masks of ``model`` along a cubic ramp over ``ramp_steps`` training steps.

    The planned ratio of each mask is read from the mask it starts with (the one-shot mask of
    ``apply_plan``); the masks are then reset to keep everything and regrown by magnitude
    every ``every`` steps. At the end of training every mask holds exactly the planned ratio,
    also when a run stopped early.
    """

    def __init__(self, model: nn.Module, ramp_steps: int, every: int = 10) -> None:
        self.targets = pruned_weights(model)
        self.ramp_steps = max(int(ramp_steps), 1)
        self.every = max(int(every), 1)
        self._set_all(0)

    def _set_all(self, step: int) -> None:
        for chain, mask, target in self.targets:
            mask.reselect(chain.original, cubic_sparsity(target, step, self.ramp_steps))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step <= self.ramp_steps and (step % self.every == 0 or step == self.ramp_steps):
            self._set_all(step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_all(self.ramp_steps)  # the planned ratio, exactly, whatever happened before


class DynamicPruning(pl.Callback):
    """Re-choose each mask by magnitude every ``every`` steps for the first ``update_steps``
    steps, with straight-through gradients, then freeze it (network surgery, Guo et al. 2016).

    The planned ratio holds at every step; only which weights are kept changes. After
    ``update_steps`` (and at the latest when training ends) the mask in force is frozen and
    gradients are masked again, so the weights that are packed are the ones trained last.
    """

    def __init__(self, model: nn.Module, update_steps: int, every: int = 10) -> None:
        self.targets = pruned_weights(model)
        self.update_steps = max(int(update_steps), 0)
        self.every = max(int(every), 1)
        self._set_straight_through(self.update_steps > 0)

    def _set_straight_through(self, on: bool) -> None:
        for _, mask, _ in self.targets:
            mask.straight_through = on

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step >= self.update_steps:
            self._set_straight_through(False)
        elif step > 0 and step % self.every == 0:
            for chain, mask, target in self.targets:
                mask.reselect(chain.original, target)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_straight_through(False)


class Prune(CompressionMethod):
    """Masks on a layer's weight tensors (both factors of a factorized one, each matrix of an
    attention or recurrent layer); scores use the teacher's input RMS only for the input side of
    a ``Linear``/``Conv`` layer, plain magnitudes elsewhere."""

    declaration = PRUNE_DECLARATION

    def needs_input_rms(self, options: Values, space: Any) -> bool:
        return options.activation_power > 0

    def apply(self, model: nn.Module, name: str, layer: nn.Module, values: LayerPlan,
              context: ApplyContext) -> nn.Module | None:
        if values["prune_ratio"] <= 0:
            return None
        power = context.options("prune").activation_power
        rms = (context.input_rms or {}).get(name) if power > 0 else None
        for position, (module, tensor_name) in enumerate(weight_tensors(layer)):
            scale = rms.pow(power) if rms is not None and position == 0 else None
            allowed = masked_before(module, tensor_name)
            weight = getattr(module, tensor_name).detach()
            mask = allowed_mask(importance(weight, scale), values["prune_ratio"], allowed)
            register_parametrization(module, tensor_name, PruneMask(mask, scale, allowed))
        return None

    def callbacks(self, context: FitContext) -> list[pl.Callback]:
        steps = round(context.options.ramp * context.epochs * context.steps_per_epoch)
        if context.options.schedule == "gradual":
            return [GradualPruning(context.student, ramp_steps=steps)]
        if context.options.schedule == "dynamic":
            return [DynamicPruning(context.student, update_steps=steps)]
        return []

    def achieved(self, layer: nn.Module) -> dict[str, float]:
        weights = [getattr(m, n).detach() for m, n in weight_tensors(layer)]
        count = sum(w.numel() for w in weights)
        return {"sparsity": sum(int((w == 0).sum()) for w in weights) / max(count, 1)}
