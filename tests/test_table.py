"""Tabular data: preparation fitted on the training split only, missing values, splits, bad tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slimtune.search import main
from slimtune.spaces import DataSpec, ModelSpec, SpecError, parse_spec
from slimtune.trainers import (
    BreastCancerDataModule, TableDataModule, build_datamodule, build_model, compressible_layers, datamodule_info,
)


def _frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Mixed columns: two numeric, one categorical, a label; a fixed train/val/test column."""
    rng = np.random.default_rng(seed)
    age = rng.normal(40, 12, n).round(1)
    income = rng.lognormal(10, 0.5, n).round(0)
    color = np.array(["red", "green", "blue"])[rng.integers(0, 3, n)].astype(object)
    label = np.where(age + rng.normal(0, 5, n) > 40, "yes", "no")
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    color[n // 2] = "purple"  # first val row: a category never seen in training
    color[-1] = "orange"      # last test row: another unseen one
    return pd.DataFrame({"age": age, "color": color, "income": income, "label": label, "split": split})


def _write(tmp_path: Path, frame: pd.DataFrame, name: str = "t.csv") -> Path:
    path = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def test_numeric_columns_standardized_with_train_statistics_only(tmp_path: Path) -> None:
    frame = _frame()
    dm = TableDataModule(_write(tmp_path, frame), target="label", categorical=["color"], split_column="split")
    assert dm.feature_names == ["age", "color=blue", "color=green", "color=red", "income"]
    train = frame[frame.split == "train"]
    for split in ("train", "val", "test"):
        part = frame[frame.split == split]
        x = dm.datasets[split].tensors[0]
        for column in ("age", "income"):
            mean, std = train[column].mean(), train[column].std(ddof=0)
            expected = torch.tensor(((part[column] - mean) / std).to_numpy(), dtype=torch.float32)
            assert torch.allclose(x[:, dm.feature_names.index(column)], expected, atol=1e-5), (split, column)
    # statistics of the whole table would give other values: val/test did not leak into them
    assert abs(frame.age.mean() - train.age.mean()) > 1e-3
    assert dm.stats["mean"]["age"] == pytest.approx(train.age.mean())
    x_train = dm.datasets["train"].tensors[0][:, [0, 4]]
    assert torch.allclose(x_train.mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(x_train.std(0, unbiased=False), torch.ones(2), atol=1e-5)


def test_one_hot_uses_training_categories_and_unseen_ones_are_all_zero(tmp_path: Path) -> None:
    frame = _frame()
    dm = TableDataModule(_write(tmp_path, frame), target="label", categorical=["color"], split_column="split")
    assert dm.stats["categories"]["color"] == ["blue", "green", "red"]
    for split in ("train", "val", "test"):
        part = frame[frame.split == split].reset_index(drop=True)
        onehot = dm.datasets[split].tensors[0][:, 1:4]
        for i, color in enumerate(part.color):
            expected = [float(color == c) for c in ("blue", "green", "red")]
            assert onehot[i].tolist() == expected, (split, i, color)
    assert dm.datasets["val"].tensors[0][0, 1:4].sum() == 0      # purple
    assert dm.datasets["test"].tensors[0][-1, 1:4].sum() == 0    # orange
    assert (dm.datasets["train"].tensors[0][:, 1:4].sum(1) == 1).all()


def test_labels_are_sorted_classes_and_split_column_is_respected(tmp_path: Path) -> None:
    frame = _frame()
    dm = TableDataModule(_write(tmp_path, frame), target="label", categorical=["color"], split_column="split")
    assert dm.classes == ["no", "yes"] and dm.num_classes == 2 and dm.input_dim == 5
    for split in ("train", "val", "test"):
        rows = np.flatnonzero(frame.split.to_numpy() == split)
        assert dm.rows[split].tolist() == rows.tolist()
        expected = (frame.label.to_numpy()[rows] == "yes").astype(np.int64)
        assert dm.datasets[split].tensors[1].tolist() == expected.tolist()
    assert dm.deterministic_train is True
    assert datamodule_info(dm) == {"input_dim": 5, "num_classes": 2}


def test_stratified_split_is_seeded_and_keeps_class_shares(tmp_path: Path) -> None:
    frame = _frame(n=200).drop(columns="split")
    path = _write(tmp_path, frame)
    dm = TableDataModule(path, target="label", categorical=["color"], val_fraction=0.25, test_fraction=0.15,
                         split_seed=3)
    sizes = {s: len(dm.datasets[s]) for s in ("train", "val", "test")}
    assert sizes == {"train": 120, "val": 50, "test": 30}
    rows = np.concatenate([dm.rows[s] for s in ("train", "val", "test")])
    assert sorted(rows.tolist()) == list(range(200))  # a partition of the table
    share = (frame.label == "yes").mean()
    for split in ("train", "val", "test"):
        assert abs(dm.datasets[split].tensors[1].float().mean().item() - share) < 0.05
    again = TableDataModule(path, target="label", categorical=["color"], val_fraction=0.25, test_fraction=0.15,
                            split_seed=3)
    other = TableDataModule(path, target="label", categorical=["color"], val_fraction=0.25, test_fraction=0.15,
                            split_seed=4)
    assert torch.equal(again.datasets["train"].tensors[0], dm.datasets["train"].tensors[0])
    assert dm.rows["val"].tolist() != other.rows["val"].tolist()


def test_parquet_reads_like_csv(tmp_path: Path) -> None:
    frame = _frame()
    a = TableDataModule(_write(tmp_path, frame), target="label", categorical=["color"], split_column="split")
    b = TableDataModule(_write(tmp_path, frame, "t.parquet"), target="label", categorical=["color"],
                        split_column="split")
    for split in ("train", "val", "test"):
        assert torch.equal(a.datasets[split].tensors[0], b.datasets[split].tensors[0])
        assert torch.equal(a.datasets[split].tensors[1], b.datasets[split].tensors[1])


def _with_missing() -> pd.DataFrame:
    frame = _frame()
    frame["income"] = frame["income"].astype(float)
    frame.loc[31, "income"] = np.nan   # a val row
    frame.loc[2, "color"] = np.nan     # a train row
    return frame


def test_missing_values_are_refused_by_default_with_counts_per_column(tmp_path: Path) -> None:
    path = _write(tmp_path, _with_missing())
    with pytest.raises(SpecError) as info:
        TableDataModule(path, target="label", categorical=["color"], split_column="split")
    text = str(info.value)
    assert text.startswith("data.missing: 'refuse'")
    assert "2 missing value(s) in 2 row(s) (color: 1, income: 1)" in text
    assert '"drop"' in text and '"impute"' in text


def test_missing_drop_removes_those_rows(tmp_path: Path) -> None:
    frame = _with_missing()
    dm = TableDataModule(_write(tmp_path, frame), target="label", categorical=["color"], split_column="split",
                         missing="drop")
    kept = frame.dropna()
    assert sum(len(dm.datasets[s]) for s in ("train", "val", "test")) == len(frame) - 2
    assert 2 not in dm.rows["train"] and 31 not in dm.rows["val"]
    train = kept[kept.split == "train"]
    assert dm.stats["mean"]["income"] == pytest.approx(train.income.mean())


def test_missing_impute_uses_train_median_and_a_missing_category(tmp_path: Path) -> None:
    frame = _with_missing()
    dm = TableDataModule(_write(tmp_path, frame), target="label", categorical=["color"], split_column="split",
                         missing="impute")
    train = frame[frame.split == "train"]
    median = train.income.median()
    assert dm.stats["median"]["income"] == pytest.approx(median)
    std = train.income.std(ddof=0)
    val_row = list(dm.rows["val"]).index(31)
    column = dm.feature_names.index("income")
    assert dm.datasets["val"].tensors[0][val_row, column].item() == pytest.approx(
        (median - train.income.mean()) / std, abs=1e-5)
    assert "color=(missing)" in dm.feature_names
    code = dm.datasets["train"].tensors[0][2]
    assert code[dm.feature_names.index("color=(missing)")] == 1
    assert sum(code[dm.feature_names.index(f"color={c}")] for c in ("blue", "green", "red")) == 0


def test_missing_labels_cannot_be_imputed(tmp_path: Path) -> None:
    frame = _frame()
    frame.loc[5, "label"] = np.nan
    with pytest.raises(SpecError, match="cannot fill the target column 'label'"):
        TableDataModule(_write(tmp_path, frame), target="label", categorical=["color"], split_column="split",
                        missing="impute")


def test_breast_cancer_preset_is_the_shipped_table() -> None:
    dm = build_datamodule(DataSpec(preset="breast-cancer"))
    assert isinstance(dm, BreastCancerDataModule)
    assert (dm.input_dim, dm.num_classes, dm.classes) == (30, 2, ["benign", "malignant"])
    sizes = [len(dm.datasets[s]) for s in ("train", "val", "test")]
    assert sum(sizes) == 569 and sizes == [341, 114, 114]
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    train = data.data[dm.rows["train"]]
    x = dm.datasets["train"].tensors[0].double()
    assert torch.allclose(x, torch.from_numpy((train - train.mean(0)) / train.std(0)), atol=1e-5)
    assert dm.datasets["train"].tensors[1].tolist() == (data.target[dm.rows["train"]] == 0).astype(int).tolist()


def test_mlp_is_sized_by_the_data_and_names_its_layers() -> None:
    dm = build_datamodule(DataSpec(preset="breast-cancer"))
    model = build_model(ModelSpec(preset="mlp", kwargs={"hidden": [16, 8, 4]}), data_info=datamodule_info(dm))
    assert compressible_layers(model) == ["fc1", "fc2", "fc3", "out"]
    assert model.fc1.in_features == 30 and model.out.out_features == 2
    with pytest.raises(SpecError, match="model.preset: 'mlp' needs input_dim"):
        build_model(ModelSpec(preset="mlp"))
    with pytest.raises(SpecError, match="model.kwargs"):
        build_model(ModelSpec(preset="mlp", kwargs={"hidden": [0]}), data_info={"input_dim": 3, "num_classes": 2})


# ---- the spec's [data] section -------------------------------------------------------------

def _spec(data: dict) -> dict:
    return {"study": {"name": "t"}, "model": {"preset": "mlp"}, "data": data}


def test_spec_table_keys_are_filled_and_round_trip() -> None:
    spec = parse_spec(_spec({"table": "x.csv", "target": "y", "categorical": ["c"]}))
    assert spec.data.table == "x.csv" and spec.data.categorical == ("c",) and spec.data.missing == "refuse"
    assert spec.to_dict()["data"] == {"table": "x.csv", "target": "y", "categorical": ["c"], "missing": "refuse",
                                      "val_fraction": 0.2, "test_fraction": 0.2, "split_seed": 0, "batch_size": 64}
    assert parse_spec(spec.to_dict()).data == spec.data
    assert DataSpec(**spec.to_dict()["data"]) == spec.data  # what an artifact's meta rebuilds


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"preset": "digits", "table": "x.csv", "target": "y"}, "data: "),
        ({"table": "x.csv"}, "data.target: None is missing"),
        ({"table": "x.xlsx", "target": "y"},
         "data.table: 'x.xlsx' is not allowed; allowed: a path to a .csv or .parquet"),
        ({"table": "x.csv", "target": "y", "missing": "mean"}, "data.missing: 'mean'"),
        ({"table": "x.csv", "target": "y", "val_fraction": 0.5, "test_fraction": 0.5}, "data.test_fraction: 0.5"),
        ({"table": "x.csv", "target": "y", "split_column": "s", "split_seed": 1}, "data.split_seed: 1 conflicts"),
        ({"table": "x.csv", "target": "y", "categorical": ["y"]}, "data.categorical: 'y' is the target"),
        ({"table": "x.csv", "target": "y", "kwargs": {}}, "data.kwargs"),
        ({"preset": "digits", "target": "y"}, "data.target: 'y' is a table option"),
        ({"table": "x.csv", "target": "y", "batch_size": 0}, "data.batch_size: 0"),
    ],
)
def test_spec_table_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(_spec(data))
    assert message in str(info.value) and "allowed:" in str(info.value)


# ---- bad tables through the CLI: exit 2, nothing written --------------------------------------

SPEC = """
[study]
name = "table-test"
trials = 1

[model]
preset = "mlp"
kwargs = {{ hidden = [8] }}

[data]
table = "{table}"
target = "{target}"
{extra}

[teacher]
epochs = 1
"""


@pytest.mark.parametrize(
    ("content", "target", "extra", "message"),
    [
        ("a,b,label\n1,2,x\n3,4,y\n", "class", "",
         "data.target: 'class' is not a column of the table; allowed: one of the table's columns ['a', 'b', 'label']"),
        ("".join(["a,label\n"] + [f"{i},same\n" for i in range(20)]), "label", "",
         "data.target: 'label' has a single class ('same')"),
        ("".join(["a,shape,label\n"] + [f"{i},{'round' if i % 2 else 'square'},{i % 2}\n" for i in range(20)]),
         "label", "", "data.categorical: [] does not name the non-numeric column 'shape' (e.g. 'square' in row 0); "
         "allowed: a list naming every non-numeric feature column: add 'shape' to categorical"),
        ("".join(["a,b,label\n"] + [f"{i},{'?' if i == 7 else i},{i % 2}\n" for i in range(20)]), "label", "",
         "does not name the non-numeric column 'b' (e.g. '?' in row 7)"),
        ("", "label", "", "data.table: '{path}' is empty"),
        ("a,label\n", "label", "", "data.table: '{path}' has no data rows"),
        ("a,label\n1,x\n", "label", 'categorical = ["colour"]', "data.categorical: 'colour' is not a column"),
    ],
    ids=["missing-target", "one-class", "undeclared-text", "text-marker", "empty", "header-only",
         "unknown-categorical"],
)
def test_bad_tables_exit_2_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                                             target: str, extra: str, message: str) -> None:
    table = tmp_path / "bad.csv"
    table.write_text(content)
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(table=table, target=target, extra=extra))
    db = tmp_path / "studies.db"
    assert main(["search", str(spec), "--storage", f"sqlite:///{db}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message.format(path=table) in err, err
    assert not db.exists()


@pytest.mark.parametrize("name", ["broken.parquet", "missing.csv"])
def test_unreadable_or_absent_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    table = tmp_path / name
    if name == "broken.parquet":
        table.write_bytes(b"this is not parquet at all" * 10)
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(table=table, target="label", extra=""))
    db = tmp_path / "studies.db"
    assert main(["search", str(spec), "--storage", f"sqlite:///{db}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"data.table: '{table}'" in err
    assert ("cannot be read" if name == "broken.parquet" else "does not exist") in err
    assert not db.exists()


def test_mlp_table_preset_searches_rank_and_l1_on_the_shipped_table() -> None:
    from slimtune.studies import load_preset

    spec = parse_spec(load_preset("mlp-table"))
    assert (spec.model.preset, spec.data.preset) == ("mlp", "breast-cancer")
    assert not spec.space.knobs["rank_ratio"].is_fixed and not spec.space.knobs["l1_weight"].is_fixed
