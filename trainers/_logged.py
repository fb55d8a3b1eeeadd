"""A value the model's own ``LightningModule`` logs in ``validation_step``, read outside a Trainer.

``[objective] monitor`` names such a value (as Lightning's ``ModelCheckpoint`` monitors one).
slimtune runs the user's ``validation_step`` on the compressed student and reduces what it
logs over the split the way Lightning reduces an epoch's validation logs: a ``torchmetrics``
metric by its ``compute()``, anything else by ``reduce_fx`` (``mean`` weighted by batch size,
the default, or ``sum``/``max``/``min``). Why not ``Trainer.validate``: the student is validated
inside our own fine-tune's loop (a Trainer per call would re-seed and re-run setup each epoch).

Example:
    >>> import lightning.pytorch as pl, torch
    >>> class Net(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layer = torch.nn.Linear(2, 2)
    ...     def forward(self, x):
    ...         return self.layer(x)
    ...     def validation_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         self.log("val_hits", (self(x).argmax(1) == y).float().mean())
    >>> batches = [(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))]
    >>> 0.0 <= logged_value(Net(), batches, "val_hits") <= 1.0
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn

_REDUCERS = {"mean", "sum", "max", "min"}


class LoggedValues:
    """What a ``LightningModule``'s ``validation_step`` logs over an epoch, reduced per name."""

    def __init__(self) -> None:
        self._sums: dict[str, tuple[str, float, float]] = {}  # name -> (reducer, accumulated, weight)
        self._metrics: dict[str, Any] = {}  # name -> a torchmetrics Metric, computed at the end

    def _log(self, name: str, value: Any, *args: Any, reduce_fx: Any = "mean", batch_size: int | None = None,
             batch: Any = None, **kwargs: Any) -> None:
        if hasattr(value, "compute") and hasattr(value, "reset"):  # a torchmetrics Metric
            self._metrics[name] = value
            return
        number = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
        reducer = reduce_fx if isinstance(reduce_fx, str) and reduce_fx in _REDUCERS else getattr(
            reduce_fx, "__name__", "mean")
        reducer = reducer if reducer in _REDUCERS else "mean"
        weight = float(batch_size if batch_size is not None else _batch_size(batch))
        old = self._sums.get(name)
        if old is None:
            self._sums[name] = (reducer, number * weight if reducer == "mean" else number, weight)
            return
        _, total, seen = old
        merged = {"mean": total + number * weight, "sum": total + number, "max": max(total, number),
                  "min": min(total, number)}[reducer]
        self._sums[name] = (reducer, merged, seen + weight)

    def values(self) -> dict[str, float]:
        """Every logged name and its epoch value (torchmetrics metrics computed, then reset)."""
        out = {name: (total / max(seen, 1.0) if reducer == "mean" else total)
               for name, (reducer, total, seen) in self._sums.items()}
        for name, metric in self._metrics.items():
            out[name] = float(torch.as_tensor(metric.compute()).float().mean())
            metric.reset()
        return out

    @contextlib.contextmanager
    def capturing(self, module: pl.LightningModule, batch: Any) -> Iterator[None]:
        """Within it, ``module.log`` and ``module.log_dict`` record here (only for this call: a
        copied module keeps Lightning's own)."""
        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            self._log(name, value, *args, batch=batch, **kwargs)

        def log_dict(values: Any, *args: Any, **kwargs: Any) -> None:
            for name, value in dict(values).items():
                self._log(name, value, *args, batch=batch, **kwargs)

        module.__dict__["log"], module.__dict__["log_dict"] = log, log_dict
        try:
            yield
        finally:
            module.__dict__.pop("log", None)
            module.__dict__.pop("log_dict", None)

    def step(self, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Run ``module.validation_step(batch, batch_idx)``, recording what it logs."""
        with self.capturing(module, batch):
            module.validation_step(batch, batch_idx)


def _batch_size(batch: Any) -> int:
    try:
        return int(extract_batch_size(batch))
    except Exception:  # Lightning's own fallback when it cannot tell is 1
        return 1


def logged_names(model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Every value ``model.validation_step`` logs over ``batches``, reduced as for an epoch."""
    if not isinstance(model, pl.LightningModule):
        raise TypeError(f"{type(model).__name__} is not a LightningModule: it logs no validation values")
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    values = LoggedValues()
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                values.step(model, move_data_to_device(batch, device), index)
    finally:
        model.train(was_training)
    return values.values()


def logged_value(model: nn.Module, batches: Iterable[Any], name: str) -> float:
    """The value ``name`` that ``model.validation_step`` logs over ``batches``; a ``KeyError``
    naming what it logs when it does not log ``name``."""
    values = logged_names(model, batches)
    if name not in values:
        raise KeyError(f"validation_step of {type(model).__name__} does not log {name!r}; "
                       f"it logs {sorted(values) or 'nothing'}")
    return values[name]
