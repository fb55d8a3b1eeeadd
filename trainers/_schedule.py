"""How a fine-tune unfolds over time: gradual pruning and the promotion gate (Lightning callbacks).

- :class:`GradualPruning` raises each layer's sparsity from 0 to its planned ratio along the
  cubic ramp of Zhu & Gupta (2017), ``s_t = s * (1 - (1 - t / T) ** 3)`` over the first ``T``
  training steps, recomputing the magnitude mask of every pruned weight every few steps. At
  the end of training every mask holds exactly the planned ratio, also when a run stopped early.
- :class:`WeightAverage` keeps an exponential moving average of the student's parameters and
  hands the averages to the student when training ends (``finetune.weight_ema``).
- :class:`PromotionGate` is slimtune's multi-fidelity rule: after ``base_epochs`` it asks
  ``decide()`` whether the trial earns more epochs, stops it if not, and otherwise decays the
  learning rate to 0 along a cosine over the extra epochs.

Example:
    >>> cubic_sparsity(0.9, step=0, ramp_steps=100), cubic_sparsity(0.9, step=50, ramp_steps=100)
    (0.0, 0.7875)
    >>> cubic_sparsity(0.9, step=100, ramp_steps=100)
    0.9
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.utils import parametrize

from ._compress import PruneMask


def cubic_sparsity(target: float, step: int, ramp_steps: int) -> float:
    """The sparsity at ``step`` of a cubic ramp reaching ``target`` after ``ramp_steps``."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return target
    return target * (1.0 - (1.0 - step / ramp_steps) ** 3)


def pruned_weights(model: nn.Module) -> list[tuple[nn.Module, PruneMask, float]]:
    """``(module, mask, planned ratio)`` for every weight carrying a :class:`PruneMask`."""
    found = []
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations["weight"]:
                if isinstance(p, PruneMask):
                    ratio = float((p.mask == 0).sum()) / p.mask.numel()
                    found.append((module, p, ratio))
    return found


class GradualPruning(pl.Callback):
    """Grow the pruning masks of ``model`` along a cubic ramp over ``ramp_steps`` training steps.

    The planned ratio of each mask is read from the mask it starts with (the one-shot mask of
    ``apply_plan``); the masks are then reset to keep everything and regrown by magnitude
    every ``every`` steps.
    """

    def __init__(self, model: nn.Module, ramp_steps: int, every: int = 10) -> None:
        self.targets = pruned_weights(model)
        self.ramp_steps = max(int(ramp_steps), 1)
        self.every = max(int(every), 1)
        self._set_all(0)

    def _set_all(self, step: int) -> None:
        for module, mask, target in self.targets:
            mask.reselect(module.parametrizations["weight"].original, cubic_sparsity(target, step, self.ramp_steps))

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

    The planned ratio holds at every step; only which weights are kept changes. While the
    masks move, pruned weights still get their gradient (``PruneMask.straight_through``), so a
    weight pruned by the teacher's magnitudes can grow back when training needs it. After
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
            for module, mask, target in self.targets:
                mask.reselect(module.parametrizations["weight"].original, target)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_straight_through(False)


class PromotionGate(pl.Callback):
    """After ``base_epochs``, train on only if ``decide()`` says so (``promoted`` records it).

    The extra epochs run with the learning rate ``lr * (1 + cos(pi * k / extra)) / 2`` in their
    ``k``-th epoch (``extra = max_epochs - base_epochs``).
    """

    def __init__(self, base_epochs: int, decide: Callable[[], bool]) -> None:
        self.base_epochs = base_epochs
        self.decide = decide
        self.promoted: bool | None = None
        self._base_lrs: list[float] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history = getattr(pl_module, "val_history", [])
        if len(history) != self.base_epochs or trainer.should_stop:
            return
        self.promoted = bool(self.decide())
        if not self.promoted:
            trainer.should_stop = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        extra = (trainer.max_epochs or 0) - self.base_epochs
        k = trainer.current_epoch - self.base_epochs
        if extra <= 0 or k < 0:
            return
        optimizer = trainer.optimizers[0]
        if not self._base_lrs:
            self._base_lrs = [group["lr"] for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, self._base_lrs):
            group["lr"] = lr * (1 + math.cos(math.pi * k / extra)) / 2


class WeightAverage(pl.Callback):
    """An exponential moving average of ``model``'s trainable parameters over the training
    steps; when training ends (also when it stopped early), the model takes the averages.

    After step ``t`` the average moves towards the weights by ``1 - d_t`` with
    ``d_t = min(decay, (1 + t) / (10 + t))``: early steps (just after one-shot pruning and
    quantization) are forgotten fast, later ones are averaged over about ``1 / (1 - decay)``
    steps. Every trainable parameter is averaged (with ``lsq``, the learned step sizes too);
    pruning masks are buffers and are not, and ``amax`` scales follow the averaged weights at
    the next forward pass. Validation during training sees the live weights.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> start = model.weight.detach().clone()
        >>> average = WeightAverage(model, decay=0.9)
        >>> average.update(); _ = model.weight.data.add_(1.0); average.update()
        >>> average.apply()  # step 1 moves the average by 1 - min(0.9, 2 / 11) = 9 / 11
        >>> torch.allclose(model.weight - start, torch.full_like(start, 9 / 11))
        True
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average: list[torch.Tensor] | None = None
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average (the first call starts it)."""
        if self.average is None:
            self.average = [p.detach().clone() for p in self.params]
            return
        self.steps += 1
        keep = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for average, p in zip(self.average, self.params):
            average.lerp_(p.detach(), 1.0 - keep)

    @torch.no_grad()
    def apply(self) -> None:
        """Copy the averages into the parameters (nothing happens before the first update)."""
        for average, p in zip(self.average or [], self.params):
            p.copy_(average)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.update()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply()
