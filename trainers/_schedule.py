"""How a fine-tune unfolds over time: the promotion gate, and a moving average of the weights.

- :class:`PromotionGate` is slimtune's multi-fidelity rule: after ``base_epochs`` it asks
  ``decide()`` whether the trial earns more epochs, stops it if not, and otherwise decays the
  learning rate to 0 along a cosine over the extra epochs.
- :func:`weight_averaging` is Lightning's ``WeightAveraging`` callback keeping an exponential
  moving average of the student's parameters (``finetune.weight_ema``): validation sees the
  averaged weights, and the student takes them when training ends (what the trial packs).

The pruning schedules are the ``prune`` method's (``slimtune.trainers.methods.prune``).

Example:
    >>> callback = weight_averaging(0.99)
    >>> type(callback).__name__
    'WeightAveraging'
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging


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


def weight_averaging(decay: float) -> WeightAveraging:
    """Lightning's ``WeightAveraging`` with an exponential moving average of the parameters (not
    the buffers: pruning masks stay as they are): after update ``n`` the average moves towards the
    weights by ``1 - d_n`` with ``d_n = min(decay, (1 + n) / (10 + n))``, so early steps (just
    after one-shot pruning and quantization) are forgotten fast and later ones are averaged over
    about ``1 / (1 - decay)`` steps. With ``lsq`` the learned step sizes are averaged too."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay}")

    def average(averaged: torch.Tensor, current: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        keep = min(decay, (1 + float(updates)) / (10 + float(updates)))
        return averaged * keep + current * (1.0 - keep)

    return WeightAveraging(use_buffers=False, avg_fn=average)
