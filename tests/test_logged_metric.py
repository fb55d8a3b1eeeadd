"""``[objective] monitor``: a value the user's own LightningModule logs in ``validation_step`` is
the study's metric, from the teacher's score to the trials, the front, the export and its checks."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import optuna
import pytest
import torch
import torchmetrics
from torch import nn

import slimtune
from slimtune.search import main
from slimtune.spaces import SpecError, metric_of, parse_spec
from slimtune.studies import keys
from slimtune.trainers import DigitsDataModule, evaluate, logged_names, logged_value

from .test_python_api import SETTINGS, SPACE, SmallNet, _trained

BASE = {"study": {"name": "s"}, "model": {"preset": "lenet300"}, "data": {"preset": "digits"}}
TRUST = ["--trust", "tests", "--trust", "slimtune.trainers"]


class LoggingNet(pl.LightningModule):
    """A LightningModule that logs its own metrics: a torchmetrics macro F1 (computed at the
    epoch's end), the mean cross-entropy per batch, and a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallNet()
        self.f1 = torchmetrics.F1Score(task="multiclass", num_classes=10, average="macro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.f1.update(logits, y)
        self.log("val_f1", self.f1)
        self.log_dict({"val_ce": nn.functional.cross_entropy(logits, y)})
        self.log("val_wrong", (logits.argmax(1) != y).float().sum(), reduce_fx="sum")


def _reference(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """The three values computed directly over the whole split."""
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    f1 = torchmetrics.functional.f1_score(logits, y, task="multiclass", num_classes=10, average="macro")
    return {"val_f1": float(f1), "val_ce": float(nn.functional.cross_entropy(logits, y)),
            "val_wrong": float((logits.argmax(1) != y).sum())}


def test_logged_values_are_reduced_over_the_split_as_lightning_reduces_an_epoch() -> None:
    model = _trained(LoggingNet())
    x, y = next(iter(DigitsDataModule().val_dataloader()))
    batches = [(x[i:i + 50], y[i:i + 50]) for i in range(0, len(y), 50)]  # an unequal last batch
    assert len({len(y) for _, y in batches}) > 1
    expected = _reference(model, batches)
    for name, value in expected.items():
        assert logged_value(model, batches, name) == pytest.approx(value, rel=1e-5), name
    # Lightning's own validate loop gives the same numbers
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    results = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        model, dataloaders=loader, verbose=False)[0]
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, rel=1e-5), name
    with pytest.raises(KeyError, match=r"does not log 'val_acc'; it logs \['val_ce', 'val_f1', 'val_wrong'\]"):
        logged_value(model, batches, "val_acc")
    assert "log" not in model.__dict__  # the capture is undone


class Reducers(pl.LightningModule):
    """Logs with each reduction Lightning offers, a step-only value, a given batch size and an epoch-end value."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.seen: list[float] = []

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, _ = batch
        value = float(x.sum())
        self.seen.append(value)
        self.log("biggest", value, reduce_fx="MAX")
        self.log("average", value, reduce_fx="avg")
        self.log("weighted", value, batch_size=1 + batch_idx)
        self.log("step_only", value, on_step=True, on_epoch=False)

    def on_validation_epoch_end(self) -> None:
        self.log("epochs", float(len(self.seen)))


def test_reductions_batch_sizes_and_epoch_hooks_follow_lightning() -> None:
    batches = [(torch.full((n, 1), float(n)), torch.zeros(n)) for n in (1, 2, 3)]  # sums 1, 4, 9
    values = torch.tensor([[1.0], [2.0], [2.0], [3.0], [3.0], [3.0]])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(values, torch.zeros(6)), batch_size=1)
    ours = logged_names(Reducers(), batches)
    assert ours["biggest"] == 9.0 and ours["average"] == pytest.approx((1 * 1 + 4 * 2 + 9 * 3) / 6)
    assert ours["weighted"] == pytest.approx((1 * 1 + 4 * 2 + 9 * 3) / 6) and ours["epochs"] == 3.0
    assert "step_only" not in ours
    theirs = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        Reducers(), dataloaders=loader, verbose=False)[0]
    mine = logged_names(Reducers(), list(loader))
    assert {k: round(v, 5) for k, v in mine.items()} == {k: round(float(v), 5) for k, v in theirs.items()}

    class Unsupported(Reducers):
        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
            self.log("median", 1.0, reduce_fx="median")

    with pytest.raises(ValueError, match="only mean, sum, max and min are supported"):
        logged_names(Unsupported(), batches)


def test_the_spec_keys_and_the_stored_metric() -> None:
    spec = parse_spec({**BASE, "objective": {"monitor": "val_ce", "mode": "min"}})
    assert spec.metric.logged and not spec.metric.maximize and spec.metric.computed.name == "accuracy"
    assert spec.metric.objective_name == "val_neg_ce"  # stored as minus the loss, named as val_neg_mse is
    assert metric_of(spec.to_dict()) == spec.metric
    with pytest.raises(SpecError, match="objective.mode: 'lowest' is not allowed"):
        parse_spec({**BASE, "objective": {"monitor": "val_ce", "mode": "lowest"}})
    with pytest.raises(SpecError, match="objective.monitor: 'accuracy' is not allowed.*use objective.metric"):
        parse_spec({**BASE, "objective": {"monitor": "accuracy"}})
    with pytest.raises(SpecError, match="objective.mode: 'min' is not allowed; allowed: mode only with"):
        parse_spec({**BASE, "objective": {"mode": "min"}})
    plain = parse_spec(BASE)
    neutral = parse_spec({**BASE, "objective": {"monitor": "", "mode": "max"}})
    assert not plain.metric.logged and plain.fingerprint() == neutral.fingerprint() != spec.fingerprint()


def test_a_study_optimizes_the_value_the_model_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    model = _trained(LoggingNet())
    data = DigitsDataModule()
    study = slimtune.search(model, data, study="logged", storage=url, trials=2, space=SPACE,
                            objective={"monitor": "val_ce", "mode": "min"},
                            factory="tests.test_logged_metric:LoggingNet",
                            data_module="slimtune.trainers:DigitsDataModule", **SETTINGS)
    optuna_study = optuna.load_study(study_name="logged", storage=url)
    assert optuna_study.metric_names[0] == "val_neg_ce"
    teacher = optuna_study.user_attrs[keys.TEACHER]
    ce = _reference(model, list(data.val_dataloader()))["val_ce"]
    assert teacher["val_accuracy"] == pytest.approx(-ce, rel=1e-5)  # a minimized value is stored as its negative

    small, record = study.best(max_drop=0.5)
    assert record.val_accuracy == pytest.approx(-_reference(small, list(data.val_dataloader()))["val_ce"], rel=1e-5)
    front = study.pareto()
    assert {"val_ce", "test_ce"} <= set(front.columns)
    assert front["val_ce"].iloc[0] == pytest.approx(-record.val_accuracy, rel=1e-6)

    # the ONNX check compares the task's own metric (accuracy): onnxruntime runs no validation_step
    capsys.readouterr()
    out = tmp_path / "m.slim"
    assert main(["export", "--study", "logged", "--storage", url, "--max-drop", "0.5", "--out", str(out),
                 "--onnx", str(tmp_path / "m.onnx"), *TRUST]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "scores val accuracy " in said and "(PyTorch " in said, said
    assert main(["evaluate", str(out), "--split", "val", "--json", *TRUST]) == 0
    assert json.loads(capsys.readouterr().out)["val_ce"] == pytest.approx(-record.val_accuracy, rel=1e-5)
    assert main(["evaluate", str(out), "--split", "test", "--json", *TRUST]) == 0
    assert json.loads(capsys.readouterr().out)["test_ce"] == pytest.approx(-record.test_accuracy, rel=1e-5)
    assert main(["studies", "--storage", url]) == 0
    listed = capsys.readouterr().out
    assert "val_ce" in listed and f"{ce:.4f}" in listed, listed  # the teacher's value, as a decimal
    assert main(["pareto", "--study", "logged", "--storage", url]) == 0
    table = capsys.readouterr().out
    assert "val_ce" in table.splitlines()[0] and "test_ce" in table.splitlines()[0], table
    assert f"{-record.val_accuracy:.4f}" in table
    assert main(["resume", "--study", "logged", "--storage", url, "--trials", "3", "--quiet", "--threads", "1",
                 *TRUST]) == 0
    assert len(study.trials()) == 3


def test_a_monitor_the_model_cannot_log_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    net = _trained(SmallNet())
    with pytest.raises(SpecError, match=r"objective.monitor: 'val_f1'.*SmallNet is not a LightningModule"):
        slimtune.search(net, DigitsDataModule(), study="bad", storage=f"sqlite:///{db}", trials=1,
                        objective={"monitor": "val_f1"})
    with pytest.raises(SpecError, match=r"objective.monitor: 'val_acc' is not logged.*\['val_ce', 'val_f1', "
                                        r"'val_wrong'\]"):
        slimtune.search(_trained(LoggingNet()), DigitsDataModule(), study="bad", storage=f"sqlite:///{db}",
                        trials=1, objective={"monitor": "val_acc"})
    assert not db.exists() or not optuna.get_all_study_names(f"sqlite:///{db}")


def test_the_fine_tune_tracks_the_logged_value_each_epoch() -> None:
    from slimtune.spaces import logged_metric, metric
    from slimtune.trainers import DistillationModule, quiet_trainer

    model = _trained(LoggingNet())
    data = DigitsDataModule()
    module = DistillationModule(model, lr=1e-3, kd_alpha=0.5, logit_temperature=4.0, feature_kd_weight=0.0,
                                feature_temperatures={}, teacher=_trained(LoggingNet()),
                                metric=logged_metric("val_wrong", "min", metric("accuracy")))
    quiet_trainer(2, seed=0).fit(module, train_dataloaders=data.train_dataloader(),
                                 val_dataloaders=data.val_dataloader())
    assert len(module.val_history) == 2
    assert module.val_history[-1] == -_reference(model, list(data.val_dataloader()))["val_wrong"]
    assert evaluate(model, data.val_dataloader(), module.metric) == -module.val_history[-1]
