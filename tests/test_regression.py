"""Any metric: a regression table end to end (CLI and Python), classification metrics other than
accuracy, and the metric's units and direction in what people read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from torch import nn

import slimtune
from slimtune.search import main
from slimtune.spaces import metric
from slimtune.studies import keys, pareto_frame, pareto_trials, study_note, write_report
from slimtune.trainers import TensorDataModule, evaluate, metric_value

from .conftest import SPEC_TOML


def _diabetes_csv(folder: Path) -> Path:
    """scikit-learn's diabetes table (442 patients, 10 features, a numeric disease progression)."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes(as_frame=True).frame
    path = folder / "diabetes.csv"
    data.to_csv(path, index=False)
    return path


def _table_spec(folder: Path, metric_name: str, drop: float) -> Path:
    table = _diabetes_csv(folder)
    spec = folder / "regression.toml"
    spec.write_text(
        f'[study]\nname = "diabetes"\ntrials = 2\nseed = 0\nmax_accuracy_drop = {drop}\n\n'
        '[model]\npreset = "mlp"\nkwargs = { hidden = [32, 16] }\n\n'
        f'[data]\ntable = "{table}"\ntarget = "target"\n\n[objective]\nmetric = "{metric_name}"\n\n'
        "[teacher]\nepochs = 40\nlr = 1e-2\nbatch_size = 32\n\n[finetune]\nepochs = 2\nbatch_size = 32\n\n"
        '[space]\nprune_ratio = { low = 0.0, high = 0.5 }\nweight_bits = { choices = [4, 8] }\n'
        "lr = { fixed = 2e-3 }\n")
    return spec


def test_a_regression_table_end_to_end_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _table_spec(tmp_path, "r2", 0.5)
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["search", str(spec), "--storage", url, "--quiet", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "teacher: R² val 0." in err, err
    study = optuna.load_study(study_name="diabetes", storage=url)
    teacher = study.user_attrs[keys.TEACHER]
    # R² of an MLP trained with MSE (88 validation patients: a noisy split; the test split reads higher)
    assert 0 < teacher["val_accuracy"] < 1 and 0.4 < teacher["test_accuracy"] < 1
    assert study.metric_names == ["val_r2", "size_bytes"]
    front = pareto_frame(study)
    assert {"val_r2", "test_r2"} <= set(front.columns) and "val_accuracy" not in front.columns

    assert main(["pareto", "--study", "diabetes", "--storage", url]) == 0
    table = capsys.readouterr().out
    assert "val_r2" in table and "%" not in table.split("\n")[1].split()[1]  # R² is shown as a number
    out = tmp_path / "m.slim"
    assert main(["export", "--study", "diabetes", "--storage", url, "--max-drop", "0.5", "--out", str(out)]) == 0
    picked = capsys.readouterr().out
    assert "R² val 0." in picked and "within 0.5 of the teacher's val 0." in picked, picked
    assert main(["evaluate", str(out), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    trial = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                 and t.values[1] == out.stat().st_size)
    assert evaluated["r2"] == pytest.approx(trial.user_attrs[keys.TRIAL_TEST_ACCURACY], abs=1e-12)
    write_report(study, url, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "val R²" in html and "R² floor" in html
    assert "`val_r2` ↑ (maximize): validation R²" in (study_note(study) or "")


def test_a_minimized_metric_is_stored_as_its_negative_and_shown_as_itself(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    spec = _table_spec(tmp_path, "mse", 5000.0)
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["search", str(spec), "--storage", url, "--quiet", "--threads", "1"]) == 0
    study = optuna.load_study(study_name="diabetes", storage=url)
    assert study.metric_names == ["val_neg_mse", "size_bytes"]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.values[0] < 0 for t in complete)  # scores: minus the MSE
    front = pareto_frame(study)
    assert (front["val_mse"] > 0).all()  # ... and the table shows the MSE itself
    assert sorted(front["val_mse"]) == sorted(-t.values[0] for t in pareto_trials(study))
    note = study_note(study) or ""
    assert "`val_neg_mse` ↑ (maximize): minus the validation MSE" in note and "above" in note
    write_report(study, url, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "val MSE" in html and "MSE is minimized and has no natural reference point" in html


def test_classification_metrics_other_than_accuracy() -> None:
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 2])
    assert metric_value("accuracy", logits, labels) == 0.75
    assert metric_value("f1", logits, labels) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert metric_value("top5_accuracy", logits, labels) == 1.0  # 3 classes: the top 3 always hold the label
    two = torch.tensor([[0.0, 2.2], [0.0, 1.4], [0.0, -0.85], [0.0, -2.2]])  # positive-class scores, falling
    assert metric_value("auroc", two, torch.tensor([1, 0, 1, 0])) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert metric("f1").format(0.5) == "50.00%" and metric("mae").format(0.5) == "0.5000"


class Regressor(nn.Module):
    """A model no preset has, one output per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(1)


def _regression_data() -> TensorDataModule:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 6)).astype(np.float32)
    y = (x[:, 0] * 2 - x[:, 1] + np.sin(x[:, 2]) + 0.1 * rng.normal(size=600)).astype(np.float32)
    t = torch.from_numpy
    return TensorDataModule({"train": (t(x[:400]), t(y[:400])), "val": (t(x[400:500]), t(y[400:500])),
                             "test": (t(x[500:]), t(y[500:]))}, batch_size=32)


def test_a_regression_model_end_to_end_from_python(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, data = Regressor(), _regression_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    model.eval()
    study = slimtune.search(model, data, study="reg", storage=f"sqlite:///{tmp_path / 's.db'}", trials=2, threads=1,
                            objective={"metric": "mae"}, max_accuracy_drop=1.0, finetune={"epochs": 2},
                            space={"weight_bits": {"choices": [4, 8]}, "lr": {"fixed": 2e-3}})
    small, record = study.best(max_drop=1.0)
    mae = evaluate(small, data.test_dataloader(), "mae")
    assert mae == pytest.approx(-record.test_accuracy, abs=1e-6) and 0 < mae < 1
    assert "val_mae" in study.pareto().columns


def test_a_regression_metric_on_a_classifier_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC_TOML.replace("[teacher]", '[objective]\nmetric = "mse"\n\n[teacher]'))
    assert main(["search", str(spec), "--storage", f"sqlite:///{tmp_path / 's.db'}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "one output per sample, (N,) or (N, 1)" in err and "Traceback" not in err
    assert not (tmp_path / "s.db").exists()
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0] * 20, "b": ["x", "y", "z"] * 20})
    frame.to_csv(tmp_path / "t.csv", index=False)
    spec.write_text(f'[study]\nname = "t"\n[model]\npreset = "mlp"\n[data]\ntable = "{tmp_path / "t.csv"}"\n'
                    'target = "b"\n[objective]\nmetric = "r2"\n')
    assert main(["search", str(spec), "--storage", f"sqlite:///{tmp_path / 's.db'}", "--quiet"]) == 2
    assert "data.target: 'b'" in capsys.readouterr().err
