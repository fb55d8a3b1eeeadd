"""In-memory data: a fast seeded loader over tensors, a data module over tensor splits, and
reading a dataset into tensors. The data presets and tables build on these.

Example:
    >>> import torch
    >>> dm = TensorDataModule({s: (torch.zeros(3, 2), torch.arange(3)) for s in ("train", "val", "test")})
    >>> [len(b[0]) for b in dm.val_dataloader()]
    [3]
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset


def batch_loader(dataset: TensorDataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A fast loader over an in-memory ``TensorDataset``: whole batches by fancy indexing.

    Example:
        >>> ds = TensorDataset(torch.arange(5.0), torch.arange(5))
        >>> [b[1].tolist() for b in batch_loader(ds, 2, shuffle=False)]
        [[0, 1], [2, 3], [4]]
    """
    if shuffle:
        sampler: Any = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)


class TensorDataModule(pl.LightningDataModule):
    """A data module over in-memory tensors, split into train/val/test. Deterministic."""

    deterministic_train = True

    def __init__(self, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int = 128,
                 eval_batch_size: int = 1000, seed: int = 0) -> None:
        super().__init__()
        self.datasets = {name: TensorDataset(x, y) for name, (x, y) in splits.items()}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        return batch_loader(self.datasets["train"], self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return batch_loader(self.datasets["val"], self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return batch_loader(self.datasets["test"], self.eval_batch_size, shuffle=False)


def materialize(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(inputs, labels)`` of a map-style dataset as two tensors, in index order."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=512, shuffle=False):  # type: ignore[arg-type]
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)
