"""Write the tables slimtune ships (``trainers/tables/*.csv``) from data bundled with scikit-learn.

Run once from the repository root (nothing is downloaded: scikit-learn carries the data)::

    .venv/bin/python benchmarks/make_tables.py

- ``breast_cancer.csv``: UCI breast cancer Wisconsin (diagnostic), ``sklearn.datasets.load_breast_cancer``:
  569 rows, the 30 numeric features under their scikit-learn names, and the label column
  ``diagnosis`` holding ``malignant`` or ``benign`` (scikit-learn's target names). Values are
  written with Python's shortest round-trip repr, so reading the CSV gives back the same floats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer

TABLES = Path(__file__).resolve().parent.parent / "trainers" / "tables"


def breast_cancer() -> pd.DataFrame:
    data = load_breast_cancer()
    frame = pd.DataFrame(data.data, columns=list(data.feature_names))
    frame["diagnosis"] = np.asarray(data.target_names)[data.target]
    return frame


def main() -> None:
    TABLES.mkdir(parents=True, exist_ok=True)
    frame = breast_cancer()
    path = TABLES / "breast_cancer.csv"
    frame.to_csv(path, index=False)
    back = pd.read_csv(path)
    assert back.drop(columns="diagnosis").to_numpy().tobytes() == frame.drop(columns="diagnosis").to_numpy().tobytes()
    print(f"wrote {path} ({len(frame)} rows, {frame.shape[1]} columns, {path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
