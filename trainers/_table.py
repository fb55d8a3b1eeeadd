"""Tabular classification data from a CSV or Parquet file, read with pandas.

In a spec::

    [data]
    table = "patients.csv"          # or .parquet; relative to the working directory
    target = "diagnosis"            # the label column (any values; classes are its sorted values)
    categorical = ["sex", "site"]   # non-numeric feature columns (one-hot encoded)
    missing = "refuse"              # refuse | drop | impute
    # split_column = "split"        # values train / val / test; else a seeded stratified split:
    val_fraction = 0.2
    test_fraction = 0.2
    split_seed = 0
    batch_size = 64

Preparation, fitted on the training split only (nothing from val/test leaks into it):

- **numeric** feature columns are standardized, ``(x - mean) / std`` with the training split's
  mean and population standard deviation (``ddof = 0``, as scikit-learn's ``StandardScaler``);
  a column constant on the training split gets std 1;
- **categorical** columns are one-hot encoded over the categories seen in the training split
  (sorted), one input per category named ``column=value``; a category first seen at val/test
  is encoded as all zeros;
- **missing values** (empty cells and pandas' default NA markers such as ``NA``, ``NaN``):
  ``refuse`` (the default) stops with the count per column; ``drop`` drops the rows that have
  any, before splitting; ``impute`` fills numeric columns with the training split's median and
  gives categorical ones a category of their own, ``(missing)`` (all zeros if training has none).
  Missing labels (or split values) cannot be imputed: use ``drop``.

A bad table is a :class:`~slimtune.spaces.SpecError` naming the key, the value and what is
allowed (missing target column, a single class, an undeclared non-numeric column, an empty or
unreadable file), raised before a study is written.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = path.write_text("x,color,y\\n" + "".join(f"{i},{'rb'[i % 2]},{i % 2}\\n" for i in range(20)))
    >>> dm = TableDataModule(path, target="y", categorical=["color"])
    >>> dm.input_dim, dm.num_classes, dm.feature_names, [len(dm.datasets[s]) for s in ("train", "val", "test")]
    (3, 2, ['x', 'color=b', 'color=r'], [12, 4, 4])
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from slimtune.spaces import MISSING_POLICIES, SPLIT_VALUES, SpecError

from ._tensordata import TensorDataModule

MISSING_CATEGORY = "(missing)"
_READABLE = "a readable CSV (comma-separated, with a header row) or Parquet file"


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The table at ``path`` (``.csv`` or ``.parquet``) as a DataFrame with string column names."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("data.table", str(path), "an existing .csv or .parquet file (relative to the working "
                        "directory)", "is not a file" if path.exists() else "does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise SpecError("data.table", str(path), "a path to a .csv or .parquet file")
    try:
        frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise SpecError("data.table", str(path), "a table with a header row and at least one data row",
                        "is empty") from None
    except Exception as exc:  # parser errors, bad encodings, not Parquet, permissions
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise SpecError("data.table", str(path), _READABLE,
                        f"cannot be read ({type(exc).__name__}: {detail})") from None
    if frame.shape[1] == 0 or len(frame) == 0:
        raise SpecError("data.table", str(path), "a table with a header row and at least one data row",
                        "is empty" if frame.shape[1] == 0 else "has no data rows")
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _not_a_number(column: pd.Series) -> tuple[Any, Any]:
    """The first value of a non-numeric column that does not read as a number, and its row."""
    present = column.dropna()
    if present.empty:
        return None, None
    coerced = pd.to_numeric(present, errors="coerce")
    bad = present[coerced.isna()]
    bad = bad if len(bad) else present
    return bad.iloc[0], bad.index[0]


def _class_order(values: np.ndarray) -> list[Any]:
    unique = list(pd.unique(values))
    try:
        return sorted(unique)
    except TypeError:  # mixed types: order by text
        return sorted(unique, key=lambda v: (type(v).__name__, str(v)))


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (so class labels read well and serialize)."""
    return value.item() if isinstance(value, np.generic) else value


class TableDataModule(TensorDataModule):
    """A CSV/Parquet table prepared for classification (see the module docs).

    Attributes besides the datasets: ``input_dim`` and ``num_classes`` (which size the ``mlp``
    model preset), ``classes`` (the label values, class ``i`` is ``classes[i]``),
    ``feature_names`` (one per input), ``rows`` (the table's row labels in each split) and
    ``stats`` (the training-split statistics used: ``mean``, ``std``, ``median``,
    ``categories``).
    """

    deterministic_train = True

    def __init__(self, table: str | os.PathLike[str], target: str, categorical: Sequence[str] = (),
                 missing: str = "refuse", split_column: str | None = None, val_fraction: float = 0.2,
                 test_fraction: float = 0.2, split_seed: int = 0, batch_size: int = 64, seed: int = 0,
                 regression: bool = False) -> None:
        if missing not in MISSING_POLICIES:
            raise SpecError("data.missing", missing, ", ".join(f'"{m}"' for m in MISSING_POLICIES))
        if split_column is None and not (0 < val_fraction < 1 and 0 < test_fraction < 1
                                         and val_fraction + test_fraction < 1):
            raise SpecError("data.val_fraction", (val_fraction, test_fraction),
                            "fractions in (0, 1) with val_fraction + test_fraction < 1")
        categorical = list(categorical)
        frame = read_table(table)
        columns = list(frame.columns)
        if target not in columns:
            raise SpecError("data.target", target, f"one of the table's columns {columns}",
                            "is not a column of the table")
        for name in categorical:
            if name not in columns:
                raise SpecError("data.categorical", name, f"columns of the table {columns}",
                                "is not a column of the table")
        if split_column is not None and split_column not in columns:
            raise SpecError("data.split_column", split_column, f"one of the table's columns {columns}",
                            "is not a column of the table")
        features = [c for c in columns if c not in (target, split_column)]
        if not features:
            raise SpecError("data.table", str(table), "a table with at least one feature column besides the target",
                            "has none")
        for name in features:
            if name not in categorical and not pd.api.types.is_numeric_dtype(frame[name]):
                example, row = _not_a_number(frame[name])
                raise SpecError("data.categorical", categorical,
                                f"a list naming every non-numeric feature column: add {name!r} to categorical "
                                "(or fix the column, or declare its missing-value marker as empty)",
                                f"does not name the non-numeric column {name!r} (e.g. {example!r} in row {row})")

        frame = self._handle_missing(frame, features, target, split_column, missing)
        if regression:
            self._regression(frame, features, categorical, target, split_column, val_fraction, test_fraction,
                             split_seed, missing, batch_size, seed)
            return
        labels = frame[target].to_numpy()
        if pd.api.types.is_float_dtype(frame[target]) and not np.all(np.mod(labels.astype(np.float64), 1) == 0):
            raise SpecError("data.target", target, "a column of class labels (integers, text or booleans)",
                            f"holds non-integer numbers ({len(pd.unique(labels))} distinct values)")
        self.classes: list[Any] = [_plain(v) for v in _class_order(labels)]
        if len(self.classes) < 2:
            raise SpecError("data.target", target, "a label column with at least two classes",
                            f"has a single class ({self.classes[0]!r})")
        y = pd.Categorical(labels, categories=_class_order(labels)).codes.astype(np.int64)

        positions = self._split(frame, y, target, split_column, val_fraction, test_fraction, split_seed)
        self.rows = {name: frame.index[pos].to_numpy() for name, pos in positions.items()}
        x, self.feature_names, self.stats = _encode(frame, features, categorical, positions["train"], missing)
        self.input_dim = x.shape[1]
        self.num_classes = len(self.classes)
        self.target = target
        splits = {name: (torch.from_numpy(x[pos]), torch.from_numpy(y[pos])) for name, pos in positions.items()}
        super().__init__(splits, batch_size=batch_size, seed=seed)

    def _regression(self, frame: pd.DataFrame, features: list[str], categorical: list[str], target: str,
                    split_column: str | None, val_fraction: float, test_fraction: float, split_seed: int,
                    missing: str, batch_size: int, seed: int) -> None:
        """A numeric target (a regression metric): float32 targets, a random split, the training
        target's mean and standard deviation (``target_mean``, ``target_std``: the ``mlp`` preset
        starts its output there)."""
        if not pd.api.types.is_numeric_dtype(frame[target]) or pd.api.types.is_bool_dtype(frame[target]):
            raise SpecError("data.target", target, "a numeric column (the objective is a regression metric)",
                            f"holds {frame[target].dtype} values")
        y = frame[target].to_numpy().astype(np.float32)
        strata = np.zeros(len(frame), dtype=np.int64)  # no classes to stratify by
        positions = self._split(frame, strata, target, split_column, val_fraction, test_fraction, split_seed)
        self.rows = {name: frame.index[pos].to_numpy() for name, pos in positions.items()}
        x, self.feature_names, self.stats = _encode(frame, features, categorical, positions["train"], missing)
        self.input_dim, self.num_classes, self.classes, self.target = x.shape[1], 1, [], target
        self.target_mean = float(y[positions["train"]].mean())
        self.target_std = float(y[positions["train"]].std()) or 1.0
        splits = {name: (torch.from_numpy(x[pos]), torch.from_numpy(y[pos])) for name, pos in positions.items()}
        super().__init__(splits, batch_size=batch_size, seed=seed)

    @staticmethod
    def _handle_missing(frame: pd.DataFrame, features: list[str], target: str, split_column: str | None,
                        missing: str) -> pd.DataFrame:
        used = features + [target] + ([split_column] if split_column else [])
        counts = {c: int(n) for c, n in frame[used].isna().sum().items() if n}
        if not counts:
            return frame
        listing = ", ".join(f"{c}: {n}" for c, n in counts.items())
        if missing == "refuse":
            rows = int(frame[used].isna().any(axis=1).sum())
            raise SpecError("data.missing", missing, 'missing = "drop" (drop those rows) or "impute" (training median '
                            f'for numeric columns, a "{MISSING_CATEGORY}" category for categorical ones)',
                            f"meets {sum(counts.values())} missing value(s) in {rows} row(s) ({listing})")
        if missing == "impute":
            unfillable = [c for c in (target, split_column) if c and c in counts]
            if unfillable:
                raise SpecError("data.missing", missing, 'missing = "drop", or a table whose target and split column '
                                "are complete", f"cannot fill the {'target' if unfillable[0] == target else 'split'} "
                                f"column {unfillable[0]!r} ({counts[unfillable[0]]} missing)")
            return frame
        kept = frame.dropna(subset=used)
        if kept.empty:
            raise SpecError("data.missing", missing, '"impute", or a table with some complete rows',
                            f"leaves no rows (every row misses a value: {listing})")
        return kept

    @staticmethod
    def _split(frame: pd.DataFrame, y: np.ndarray, target: str, split_column: str | None, val_fraction: float,
               test_fraction: float, split_seed: int) -> dict[str, np.ndarray]:
        if split_column is not None:
            values = frame[split_column].astype(str).to_numpy()
            other = sorted(set(values) - set(SPLIT_VALUES))
            if other:
                raise SpecError("data.split_column", split_column,
                                f"a column whose values are {', '.join(SPLIT_VALUES)}", f"holds other values {other[:5]}")
            positions = {name: np.flatnonzero(values == name) for name in SPLIT_VALUES}
            empty = [name for name, pos in positions.items() if len(pos) == 0]
            if empty:
                raise SpecError("data.split_column", split_column, "a column with train, val and test rows",
                                f"has no {empty[0]!r} rows")
            return positions
        from sklearn.model_selection import train_test_split

        index = np.arange(len(frame))
        try:
            rest, test = train_test_split(index, test_size=test_fraction, random_state=split_seed, stratify=y)
            train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), random_state=split_seed,
                                          stratify=y[rest])
        except ValueError as exc:
            raise SpecError("data.target", target, "enough rows of every class for a stratified split into train, val "
                            "and test (or a split_column)", f"cannot be split ({exc})") from None
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _encode(frame: pd.DataFrame, features: list[str], categorical: list[str], train: np.ndarray,
            missing: str) -> tuple[np.ndarray, list[str], dict[str, dict[str, Any]]]:
    """Inputs (float32, one row per table row) with statistics from the ``train`` rows only."""
    blocks: list[np.ndarray] = []
    names: list[str] = []
    stats: dict[str, dict[str, Any]] = {"mean": {}, "std": {}, "median": {}, "categories": {}}
    for name in features:
        column = frame[name]
        if name in categorical:
            text = np.array([MISSING_CATEGORY if pd.isna(v) else str(v) for v in column], dtype=object)
            categories = sorted(set(text[train]))
            stats["categories"][name] = categories
            blocks.append(np.stack([text == c for c in categories], axis=1).astype(np.float64))
            names.extend(f"{name}={c}" for c in categories)
            continue
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        if missing == "impute" and np.isnan(values).any():
            known = values[train][~np.isnan(values[train])]
            if known.size == 0:
                raise SpecError("data.missing", missing, '"drop", or a column with some values in the training split',
                                f"cannot fill column {name!r}: the training split has no value in it")
            stats["median"][name] = float(np.median(known))
            values = np.where(np.isnan(values), stats["median"][name], values)
        mean = float(values[train].mean())
        std = float(values[train].std())
        std = std if std > 0 else 1.0
        stats["mean"][name], stats["std"][name] = mean, std
        blocks.append(((values - mean) / std)[:, None])
        names.append(name)
    return np.concatenate(blocks, axis=1).astype(np.float32), names, stats


def shipped_table(name: str) -> Path:
    """The path of a table shipped with slimtune (``slimtune/trainers/tables/<name>``)."""
    return Path(str(importlib.resources.files("slimtune.trainers").joinpath("tables", name)))


class BreastCancerDataModule(TableDataModule):
    """UCI breast cancer Wisconsin (diagnostic), as scikit-learn ships it: 569 tumours, 30 numeric
    features, ``diagnosis`` malignant (212) or benign (357). The CSV is shipped with slimtune
    (``benchmarks/make_tables.py`` wrote it); a seeded stratified 60/20/20 split."""

    def __init__(self, batch_size: int = 64, split_seed: int = 0, val_fraction: float = 0.2,
                 test_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__(shipped_table("breast_cancer.csv"), target="diagnosis", batch_size=batch_size,
                         split_seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
