"""A value the model's own ``LightningModule`` logs in ``validation_step``, read outside a Trainer.

``[objective] monitor`` names such a value (as Lightning's ``ModelCheckpoint`` monitors one).
slimtune runs the user's ``on_validation_epoch_start``, ``validation_step`` and
``on_validation_epoch_end`` on the compressed student and reduces what they log over the split
the way Lightning reduces an epoch's validation logs: a ``torchmetrics`` metric by its
``compute()``, anything else by ``reduce_fx`` (``mean`` weighted by the batch size, the default,
or ``sum``/``max``/``min``); a value logged with ``on_epoch=False`` has no epoch value. Why not
``Trainer.validate``: the student is validated inside our own fine-tune's loop (a Trainer per call
would re-seed and re-run setup each epoch). Outside the fine-tune no Trainer is attached, so a
``validation_step`` that reads ``self.trainer`` cannot be evaluated (it is refused at spec time).

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

_REDUCERS = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}


def _reducer(reduce_fx: Any) -> str:
    """Lightning's name for a ``reduce_fx``: ``mean`` (also ``avg`` or ``torch.mean``), ``sum``,
    ``max`` or ``min``, any case; a ``ValueError`` for anything else, as Lightning refuses it."""
    name = reduce_fx.lower() if isinstance(reduce_fx, str) else getattr(reduce_fx, "__name__", "")
    if name not in _REDUCERS:
        raise ValueError(f"self.log(..., reduce_fx={reduce_fx!r}): only mean, sum, max and min are supported")
    return _REDUCERS[name]


class LoggedValues:
    """What a ``LightningModule`` logs over a validation epoch (``validation_step`` and the epoch
    hooks), reduced per name."""

    def __init__(self) -> None:
        self._sums: dict[str, tuple[str, float, float]] = {}  # name -> (reducer, accumulated, weight)
        self._metrics: dict[str, Any] = {}  # name -> a torchmetrics Metric, computed at the end

    def _log(self, name: str, value: Any, *args: Any, reduce_fx: Any = "mean", batch_size: int | None = None,
             on_epoch: bool | None = None, batch: Any = None, **kwargs: Any) -> None:
        """Record one ``self.log`` call (``batch``: the step's batch, for its size; ``None`` in an epoch hook)."""
        if on_epoch is False:  # a step-only value: Lightning gives it no epoch value either
            return
        if hasattr(value, "compute") and hasattr(value, "reset"):  # a torchmetrics Metric
            self._metrics[name] = value
            return
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise ValueError(f"self.log({name!r}, ...) got a tensor of shape {tuple(value.shape)}; "
                             "one value per call is what Lightning logs")
        number = float(value.detach().float()) if isinstance(value, torch.Tensor) else float(value)
        reducer = _reducer(reduce_fx)
        weight = float(batch_size if batch_size is not None else (1 if batch is None else _batch_size(batch, name)))
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

    def value_of(self, name: str, module: nn.Module) -> float:
        """The epoch value of ``name``; a ``KeyError`` naming what ``module`` logs when it does not log it."""
        values = self.values()
        if name not in values:
            raise KeyError(f"validation_step of {type(module).__name__} does not log {name!r}; "
                           f"it logs {sorted(values) or 'nothing'}")
        return values[name]

    def step(self, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Run ``module.validation_step(batch, batch_idx)``, recording what it logs."""
        with self.capturing(module, batch):
            module.validation_step(batch, batch_idx)

    def epoch_start(self, module: pl.LightningModule) -> None:
        """Run ``module.on_validation_epoch_start()``, recording what it logs."""
        with self.capturing(module, None):
            module.on_validation_epoch_start()

    def epoch_end(self, module: pl.LightningModule) -> None:
        """Run ``module.on_validation_epoch_end()`` (where many modules log epoch values), recording what it logs."""
        with self.capturing(module, None):
            module.on_validation_epoch_end()


def _batch_size(batch: Any, name: str) -> int:
    """The batch's size as Lightning infers it; a ``ValueError`` naming the value when it cannot
    (Lightning then asks for ``self.log(..., batch_size=...)`` too)."""
    try:
        return int(extract_batch_size(batch))
    except Exception:
        raise ValueError(f"self.log({name!r}, ...): the batch size cannot be inferred from the batch; "
                         "pass batch_size=") from None


def _run_epoch(model: nn.Module, batches: Iterable[Any]) -> LoggedValues:
    """``model``'s validation epoch hooks and steps over ``batches``, in eval mode, what they log recorded."""
    if not isinstance(model, pl.LightningModule):
        raise TypeError(f"{type(model).__name__} is not a LightningModule: it logs no validation values")
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    values = LoggedValues()
    try:
        with torch.no_grad():
            values.epoch_start(model)
            for index, batch in enumerate(batches):
                values.step(model, move_data_to_device(batch, device), index)
            values.epoch_end(model)
    finally:
        model.train(was_training)
    return values


def logged_names(model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Every value ``model.validation_step`` logs over ``batches``, reduced as for an epoch."""
    return _run_epoch(model, batches).values()


def logged_value(model: nn.Module, batches: Iterable[Any], name: str) -> float:
    """The value ``name`` that ``model.validation_step`` logs over ``batches``; a ``KeyError``
    naming what it logs when it does not log ``name``."""
    return _run_epoch(model, batches).value_of(name, model)
