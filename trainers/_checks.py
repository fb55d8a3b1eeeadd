"""Checks of a model and its data before a study is written: one forward pass, finite numbers, splits.

:func:`check_model_and_data` runs before the study row exists, so a wrong model or data module is
a :class:`~slimtune.spaces.SpecError` (exit 2) and the corrected spec then starts afresh, without
``--force``.

Example:
    >>> from slimtune.spaces import DataSpec
    >>> from slimtune.trainers import DigitsCNN, build_datamodule
    >>> check_model_and_data(DigitsCNN(), build_datamodule(DataSpec(preset="digits")))
    >>> try:
    ...     check_model_and_data(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5)),
    ...                          build_datamodule(DataSpec(preset="digits")))
    ... except SpecError as err:
    ...     print(str(err).split(";")[0])
    model: 'outputs of shape (359, 5)' is not allowed
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimtune.spaces import Metric, SpecError

SPLITS = ("train", "val", "test")


def _first_batch(loader: Iterable[Any], split: str) -> Any:
    try:
        return next(iter(loader))
    except StopIteration:
        raise SpecError("data", f"the {split} split", "train, val and test splits with at least one sample each",
                        "is empty") from None


def _inputs_and_labels(batch: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not all(
            isinstance(t, torch.Tensor) for t in batch[-2:]):
        raise SpecError("data", f"a {split} batch of type {type(batch).__name__}",
                        "batches (inputs, labels) of tensors (the last two items of each batch)")
    return batch[-2], batch[-1]


def _split_size(loader: Any) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _labels(loader: Any, split: str, whole: bool) -> Iterable[torch.Tensor]:
    """The split's labels: all of them from an in-memory dataset or when ``whole``, else the first batch's."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, TensorDataset):
        yield dataset.tensors[-1]
        return
    for number, batch in enumerate(loader):
        if number and not whole:
            return
        yield _inputs_and_labels(batch, split)[1]


def _max_label(loader: Any, split: str, whole: bool) -> int:
    """The largest label seen (labels must be non-negative integers)."""
    largest = -1
    for y in _labels(loader, split, whole):
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise SpecError("data", f"{split} labels of dtype {y.dtype}", "integer class labels 0, 1, ..., C-1")
        if y.numel():
            if int(y.min()) < 0:
                raise SpecError("data", f"{split} label {int(y.min())}", "integer class labels 0, 1, ..., C-1")
            largest = max(largest, int(y.max()))
    return largest


def check_finite_weights(model: nn.Module, what: str = "the teacher") -> None:
    """Raise :class:`SpecError` if a parameter or buffer of ``model`` holds NaN or infinity."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SpecError("model", f"{what}, whose {name} holds NaN or infinite values",
                            "a teacher whose weights are finite numbers")


def check_model_and_data(model: nn.Module, dm: Any, loaded_weights: bool = False, regression: bool = False) -> None:
    """Raise :class:`SpecError` unless ``dm``'s train, val and test splits are non-empty, a
    validation batch's inputs are finite, ``model`` maps it to finite ``(N, C)`` logits with ``C``
    greater than every validation and training label, and (``loaded_weights``: a checkpoint or a
    stored teacher) every parameter and buffer of ``model`` is finite."""
    if loaded_weights:
        check_finite_weights(model, "the loaded checkpoint")
    loaders = {"train": dm.train_dataloader(), "val": dm.val_dataloader(), "test": dm.test_dataloader()}
    for split, loader in loaders.items():
        if _split_size(loader) == 0:
            raise SpecError("data", f"the {split} split", "train, val and test splits with at least one sample each",
                            "is empty")
        _first_batch(loader, split)
    x, y = _inputs_and_labels(_first_batch(loaders["val"], "val"), "val")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise SpecError("data", "validation inputs with NaN or infinite values", "finite inputs")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise SpecError("model", f"a forward pass on a validation batch of shape {tuple(x.shape)}",
                        "a model that accepts the data's inputs",
                        f"fails ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''})"
                        ) from None
    finally:
        model.train(was_training)
    n = x.shape[0] if x.dim() else 0
    if regression:
        _check_regression(out, y, n, tuple(x.shape[1:]))
        return
    # every validation label; the training labels of an in-memory set, else of the first batch
    largest = max(_max_label(loaders["val"], "val", whole=True), _max_label(loaders["train"], "train", whole=False))
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n or out.shape[1] <= largest:
        shown = f"outputs of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise SpecError("model", shown, f"logits of shape (N, C) = ({n}, C) with C > {largest}, the largest label, "
                        f"for a batch of {n} inputs of shape {tuple(x.shape[1:])}")
    if not bool(torch.isfinite(out).all()):
        raise SpecError("model", "logits with NaN or infinite values", "finite logits on the validation inputs")


def _check_regression(out: Any, y: torch.Tensor, n: int, shape: tuple[int, ...]) -> None:
    """One finite output per sample and finite numeric targets (a regression metric)."""
    if not y.is_floating_point() and not y.dtype.is_signed:
        raise SpecError("data", f"val targets of dtype {y.dtype}", "numeric targets (the objective is a regression metric)")
    if not bool(torch.isfinite(y.float()).all()):
        raise SpecError("data", "validation targets with NaN or infinite values", "finite numeric targets")
    if not isinstance(out, torch.Tensor) or out.shape[0:1] != (n,) or out.numel() != y.numel():
        shown = f"outputs of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise SpecError("model", shown, f"one output per sample, (N,) or (N, 1), for the regression targets of shape "
                        f"{tuple(y.shape)} (a batch of {n} inputs of shape {shape})")
    if not bool(torch.isfinite(out).all()):
        raise SpecError("model", "outputs with NaN or infinite values", "finite outputs on the validation inputs")


def check_logged_metric(model: nn.Module, dm: Any, metric: Metric) -> None:
    """Raise :class:`SpecError` unless ``model`` is a ``LightningModule`` whose ``validation_step``,
    run on one validation batch, logs ``metric.name`` (``[objective] monitor``); nothing for a
    built-in metric."""
    if not metric.logged:
        return
    import lightning.pytorch as pl

    from ._logged import logged_names

    if not isinstance(model, pl.LightningModule):
        raise SpecError("objective.monitor", metric.name, "a value that the model's own LightningModule logs in "
                        f"validation_step, or no monitor (then objective.metric, here {metric.computed.name})",
                        f"cannot be read: {type(model).__name__} is not a LightningModule")
    batch = _first_batch(dm.val_dataloader(), "val")
    try:
        logged = logged_names(model, [batch])
    except Exception as exc:
        raise SpecError("objective.monitor", metric.name, "a validation_step that runs on one batch outside a "
                        "Trainer (it may call self.log and self.log_dict)",
                        f"cannot be read: {type(model).__name__}.validation_step raised {type(exc).__name__}: "
                        f"{str(exc).strip()[:300]}") from None
    if metric.name not in logged:
        raise SpecError("objective.monitor", metric.name, f"a name {type(model).__name__}.validation_step logs: "
                        f"{sorted(logged) or 'it logs nothing'}", "is not logged")
    if not math.isfinite(logged[metric.name]):
        raise SpecError("objective.monitor", metric.name, "a finite value on the validation data",
                        f"is {logged[metric.name]} on a validation batch")
