"""The Python API on objects: a model the user holds (not a preset), its own weights as the
teacher, the study's front, best model and artifact from Python, and what other processes can
and cannot do with such a study."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import optuna
import pytest
import torch
from torch import nn

import slimtune
from slimtune.search import main
from slimtune.spaces import SpecError
from slimtune.studies import keys, pareto_trials, study_note
from slimtune.trainers import DigitsDataModule, OnnxModel, evaluate

SPACE = {"prune_ratio": {"low": 0.2, "high": 0.8}, "weight_bits": {"choices": [4, 8]}, "lr": {"fixed": 2e-3}}
SETTINGS = {"finetune": {"epochs": 1, "batch_size": 64}, "max_accuracy_drop": 0.5, "threads": 1}


class SmallNet(nn.Module):
    """A model no preset has: two Linear layers on flattened 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class LitNet(pl.LightningModule):
    """A LightningModule as the teacher (its forward gives logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _trained(model: nn.Module) -> nn.Module:
    """``model`` after a few seeded epochs of plain torch training on digits (the user's own
    training, outside slimtune)."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    data = DigitsDataModule()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(6):
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return _trained(SmallNet())


def test_a_model_object_is_searched_with_its_own_weights_as_the_teacher(net: nn.Module, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    weights = copy.deepcopy(net.state_dict())
    data = DigitsDataModule()
    study = slimtune.search(net, data, study="api-net", storage=url, trials=3, space=SPACE, **SETTINGS)
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())  # the caller's model unchanged
    states = [t.state for t in study.optuna_study.trials]
    complete, pruned = states.count(optuna.trial.TrialState.COMPLETE), states.count(optuna.trial.TrialState.PRUNED)
    assert (f"study api-net: 3/3 finished trials ({complete} complete, {pruned} stopped below the accuracy floor; "
            "3 run now") in capsys.readouterr().err

    optuna_study = optuna.load_study(study_name="api-net", storage=url)
    teacher = optuna_study.user_attrs[keys.TEACHER]
    assert teacher["source"] == "given (tests.test_python_api:SmallNet, as passed to slimtune.search)"
    assert teacher["val_accuracy"] == pytest.approx(evaluate(net, data.val_dataloader()), abs=1e-12)  # not retrained
    assert optuna_study.user_attrs[keys.SPEC]["model"] == {"given": "tests.test_python_api:SmallNet"}

    front = study.pareto()
    assert list(front["trial"]) == [t.number for t in pareto_trials(optuna_study)] and len(front) >= 1
    assert len(study.trials()) == 3
    small, record = study.best(max_drop=0.5)
    assert record.number == front["trial"].iloc[0]  # the smallest within the drop: the front's first
    assert evaluate(small, data.val_dataloader()) == pytest.approx(record.val_accuracy, abs=1e-12)
    assert evaluate(small, data.test_dataloader()) == pytest.approx(record.test_accuracy, abs=1e-12)
    out = study.export(tmp_path / "net.slim", max_drop=0.5, onnx=tmp_path / "net.onnx")
    assert out.stat().st_size == record.size_bytes
    onnx_val = evaluate(OnnxModel(tmp_path / "net.onnx"), data.val_dataloader())
    assert onnx_val == pytest.approx(record.val_accuracy, abs=1e-3)  # the integer ONNX runs as recorded
    with pytest.raises(SpecError, match="data module the study was searched from"):  # its data is an object too
        slimtune.load_study("api-net", url, model=net).export(tmp_path / "y.slim", max_drop=0.5,
                                                              onnx=tmp_path / "y.onnx")
    assert not (tmp_path / "y.slim").exists() and not (tmp_path / "y.onnx").exists()
    assert "`tests.test_python_api:SmallNet` (given to slimtune.search as a Python object)" in study_note(optuna_study)
    assert study.report(tmp_path / "r.html").stat().st_size > 1_000_000

    # the same call with a larger target continues the study, with the stored teacher
    capsys.readouterr()
    again = slimtune.search(net, DigitsDataModule(), study="api-net", storage=url, trials=4, space=SPACE, **SETTINGS)
    assert len(again.trials()) == 4 and "other weights" not in capsys.readouterr().err
    assert slimtune.load_study("api-net", url).pareto()["trial"].tolist()[0] == again.pareto()["trial"].tolist()[0]

    # other processes have no model object: they say what to do instead of failing on an import
    capsys.readouterr()
    for argv in (["resume", "--study", "api-net", "--storage", url], ["evaluate", str(out)],
                 ["export", "--study", "api-net", "--storage", url, "--max-drop", "0.5",
                  "--out", str(tmp_path / "x.slim"), "--onnx", str(tmp_path / "x.onnx")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        named = ("model.given: 'tests.test_python_api:SmallNet'",
                 "data.given: 'slimtune.trainers._data:DigitsDataModule'")
        assert any(f"{what} was given to slimtune.search as a Python object, which this process does not have" in err
                   for what in named), err
        assert "continue it from Python" in err and "Traceback" not in err
    assert not (tmp_path / "x.slim").exists() and not (tmp_path / "x.onnx").exists()
    # ... while what needs only the database works
    assert main(["pareto", "--study", "api-net", "--storage", url]) == 0
    assert main(["export", "--study", "api-net", "--storage", url, "--max-drop", "0.5",
                 "--out", str(tmp_path / "copy.slim")]) == 0
    now = again.export(tmp_path / "now.slim", max_drop=0.5)  # the study as it is now: the fourth trial may lead
    assert (tmp_path / "copy.slim").read_bytes() == now.read_bytes()


def test_a_lightning_module_with_a_factory_resumes_and_evaluates_in_other_processes(tmp_path: Path,
                                                                                    capsys: pytest.CaptureFixture[str]
                                                                                    ) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    lit = _trained(LitNet())
    study = slimtune.search(lit, DigitsDataModule(), study="lit-net", storage=url, trials=2, space=SPACE,
                            factory="tests.test_python_api:LitNet", data_module="slimtune.trainers:DigitsDataModule",
                            **SETTINGS)
    _, record = study.best(max_drop=0.5)
    out = study.export(tmp_path / "lit.slim", max_drop=0.5)
    trust = ["--trust", "tests", "--trust", "slimtune.trainers"]
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json", *trust]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(record.test_accuracy, abs=1e-12)
    assert main(["resume", "--study", "lit-net", "--storage", url, "--trials", "3", "--quiet", "--threads", "1",
                 *trust]) == 0
    assert len(study.trials()) == 3
    teacher = optuna.load_study(study_name="lit-net", storage=url).user_attrs[keys.TEACHER]
    assert teacher["source"].startswith("given (tests.test_python_api:LitNet")


def test_bad_settings_raise_before_anything_is_written(net: nn.Module, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    with pytest.raises(SpecError, match="lives in this call's memory only"):
        slimtune.search(net, DigitsDataModule(), study="bad", storage="sqlite:///:memory:", trials=1)
    with pytest.raises(SpecError, match="is not a torch module"):
        slimtune.search(SmallNet, DigitsDataModule(), study="bad", storage=f"sqlite:///{db}")
    with pytest.raises(SpecError, match=r"model.factory: 'tests.test_python_api:BilinearNet' builds another model"):
        slimtune.search(net, DigitsDataModule(), study="bad", storage=f"sqlite:///{db}",
                        factory="tests.test_python_api:BilinearNet")
    with pytest.raises(SpecError, match=r"slimtune.search\(finetun=...\).*is not a known setting"):
        slimtune.search(net, DigitsDataModule(), study="bad", storage=f"sqlite:///{db}", finetun={"epochs": 1})
    with pytest.raises(SpecError, match="finetune.epochs"):
        slimtune.search(net, DigitsDataModule(), study="bad", storage=f"sqlite:///{db}", finetune={"epochs": 0})
    assert not db.exists()


class BilinearNet(nn.Module):
    """The digit's two halves mixed by an ``nn.Bilinear`` (no method compresses its 3-D weight), then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Bilinear(32, 32, 24)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return self.head(torch.relu(self.mix(flat[:, :32], flat[:, 32:])))


def test_weights_no_method_compresses_are_named_before_the_search(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = slimtune.search(_trained(BilinearNet()), DigitsDataModule(), study="bilinear", storage=url, trials=1,
                            space=SPACE, **SETTINGS)
    err = capsys.readouterr().err
    share = 4 * 24 * 32 * 32 / (4 * sum(p.numel() for p in BilinearNet().parameters()))
    assert (f"no method compresses 1 weight tensor ({100 * share:.1f}% of the model's fp32 bytes), stored as "
            "float32 in every artifact: mix.weight (Bilinear, 24,576 values)") in err, err
    assert len(study.trials()) == 1


def test_a_spec_dict_keeps_its_storage_and_target_unless_a_keyword_says_otherwise(net: nn.Module) -> None:
    spec = {"study": {"storage": "postgresql+psycopg://u@db/x", "trials": 100}, "finetune": {"epochs": 3}}
    data = slimtune.search.spec_for_objects(net, DigitsDataModule(), study="s", spec=spec, finetune={"batch_size": 32})
    assert data["study"] == {"name": "s", "storage": "postgresql+psycopg://u@db/x", "trials": 100}
    assert data["finetune"] == {"epochs": 3, "batch_size": 32}
    assert slimtune.search.spec_for_objects(net, DigitsDataModule(), study="s", spec=spec, trials=5)["study"][
        "trials"] == 5


def test_other_weights_than_the_stored_teacher_are_said(net: nn.Module) -> None:
    from slimtune.search._runner import _say_if_other_weights

    study = optuna.create_study(directions=keys.DIRECTIONS)
    said: list[str] = []
    study.set_user_attr(keys.TEACHER, {"weights_sha256": "0" * 64})
    _say_if_other_weights(study, net, said.append)
    assert said and "the model passed has other weights than study" in said[0]
