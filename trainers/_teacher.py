"""The teacher: trained once per study (or loaded), evaluated, serialized, and its outputs cached.

Example:
    >>> import torch
    >>> from torch import nn
    >>> teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> cache = TeacherCache.build(teacher, torch.randn(10, 4), torch.zeros(10, dtype=torch.long), ["1"], budget_mb=1)
    >>> logits, feats = cache.lookup(torch.tensor([0, 2]), ["1"])
    >>> logits.shape, feats["1"].shape
    (torch.Size([2, 3]), torch.Size([2, 3]))
"""

from __future__ import annotations

import io
from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimtune.spaces import Metric, Values

from ._tensordata import batch_loader, materialize
from ._lightning import ACCURACY, ClassifierModule, FeatureTap, quiet_trainer
from ._logged import logged_value
from ._metrics import MetricAccumulator


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Any], metric: str | Metric = "accuracy") -> float:
    """The ``metric`` (top-1 accuracy by default; see ``slimtune.spaces.METRICS``) of ``model``
    over ``(x, y)`` batches (the last two items of each batch), in the metric's own units; a
    logged metric (``[objective] monitor``) as the model's own ``validation_step`` logs it."""
    if isinstance(metric, Metric):
        if metric.logged:
            return logged_value(model, batches, metric.name)
        metric = metric.name
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    accumulated = MetricAccumulator(metric)
    try:
        for batch in batches:
            accumulated.update(model(batch[-2].to(device)), batch[-1])
    finally:
        model.train(was_training)
    return accumulated.value()


def train_loader_for(dm: pl.LightningDataModule, batch_size: int, seed: int) -> Any:
    """Our fast seeded loader over the materialized training set when the data module declares
    it deterministic, else the data module's own ``train_dataloader``."""
    if getattr(dm, "deterministic_train", False):
        x, y = materialize(dm.train_dataloader().dataset)
        return batch_loader(TensorDataset(x, y), batch_size, shuffle=True, seed=seed)
    return dm.train_dataloader()


def train_teacher(model: nn.Module, dm: pl.LightningDataModule, spec: Values, seed: int,
                  logger: Any = None, runtime: Any = None, metric: Metric | None = None) -> nn.Module:
    """Train ``model`` with cross-entropy for ``spec.epochs`` (Adam, cosine schedule; images shifted
    by up to ``spec.augment_shift`` pixels when it is set); in place, and back on the CPU.
    ``logger``: a Lightning logger for the run (``run_logger``), or none; ``runtime``: the spec's
    ``[runtime]`` (accelerator, precision); ``metric``: the study's (a regression metric trains with MSE)."""
    trainer = quiet_trainer(spec.epochs, seed, logger=logger, runtime=runtime)
    module = ClassifierModule(model, spec.lr, spec.augment_shift, seed, metric=metric or ACCURACY)
    trainer.fit(module, train_dataloaders=train_loader_for(dm, spec.batch_size, seed),
                val_dataloaders=dm.val_dataloader())
    return model.cpu().eval()


def state_to_bytes(model: nn.Module) -> bytes:
    """A model's ``state_dict`` as ``torch.save`` bytes (read back with ``weights_only=True``)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def load_state_bytes(model: nn.Module, data: bytes) -> nn.Module:
    """Load :func:`state_to_bytes` output into ``model`` (tensors only, no pickled objects)."""
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return model.eval()


class TeacherCache:
    """Teacher logits (and, within a memory budget, hidden-layer outputs) for every training
    sample, computed once per study and process, looked up by sample index in every trial."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
        self.x, self.y, self.logits, self.features = x, y, logits, features

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, feature_layers: list[str],
              budget_mb: int, batch_size: int = 1000) -> TeacherCache:
        teacher.eval()
        tap = FeatureTap(teacher, feature_layers)
        try:
            teacher(x[:1])
            per_sample = sum(out[0].numel() for out in tap.outputs.values())
            keep_features = bool(feature_layers) and per_sample * x.shape[0] * 2 <= budget_mb * 2**20
            logits, features = [], {n: [] for n in feature_layers} if keep_features else {}
            for start in range(0, x.shape[0], batch_size):
                logits.append(teacher(x[start:start + batch_size]))
                for name in features:
                    features[name].append(tap.outputs[name].to(torch.float16))
        finally:
            tap.remove()
        return cls(x, y, torch.cat(logits), {n: torch.cat(v) for n, v in features.items()})

    def has_features(self, names: list[str]) -> bool:
        return all(n in self.features for n in names)

    def lookup(self, index: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.logits[index], {n: self.features[n][index].float() for n in names}

    def loader(self, batch_size: int, seed: int) -> Any:
        """Shuffled ``(index, x, y)`` batches over the cached training set."""
        index = torch.arange(self.x.shape[0])
        return batch_loader(TensorDataset(index, self.x, self.y), batch_size, shuffle=True, seed=seed)
