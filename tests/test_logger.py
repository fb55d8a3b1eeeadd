"""``[runtime] logger``: every fine-tune (and the teacher's training) with a Lightning logger,
off by default."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import optuna
import pytest

from slimtune.search import main
from slimtune.studies import records

from .conftest import SPEC_TOML


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_a_csv_logger_writes_each_trials_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = tmp_path / "logs"
    spec = tmp_path / "study.toml"
    spec.write_text(SPEC_TOML.replace("trials = 3", "trials = 2").replace("[finetune]\nepochs = 1", "[runtime]\n"
                    "logger = \"csv\"\nlog_dir = \"logs\"\n\n[finetune]\nepochs = 2"))
    url = f"sqlite:///{tmp_path / 's.db'}"
    monkeypatch.chdir(tmp_path)  # log_dir is relative to the working directory
    assert main(["search", str(spec), "--storage", url, "--quiet", "--threads", "1"]) == 0
    teacher = [r for r in _rows(logs / "digits-test" / "teacher" / "metrics.csv") if r.get("val_accuracy")]
    assert len(teacher) == 8  # one validation per teacher epoch
    study = optuna.load_study(study_name="digits-test", storage=url)
    for record in records(study):
        rows = _rows(logs / "digits-test" / f"trial-{record.number}" / "metrics.csv")
        curve = [float(r["val_accuracy"]) for r in rows if r.get("val_accuracy")]
        assert curve == pytest.approx(record.val_history)  # the logged curve is the recorded one
        losses = [r for r in rows if r.get("train_loss")]
        assert len(losses) == len(record.val_history)


def test_without_a_logger_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "study.toml"
    spec.write_text(SPEC_TOML.replace("trials = 3", "trials = 1"))
    assert main(["search", str(spec), "--storage", f"sqlite:///{tmp_path / 's.db'}", "--quiet", "--threads", "1"]) == 0
    assert not (tmp_path / "slimtune-logs").exists() and not (tmp_path / "lightning_logs").exists()


def test_tensorboard_without_the_package_exits_2_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # a machine without tensorboard, wherever this runs
                        lambda name, *args: None if name.split(".")[0] in ("tensorboard", "tensorboardX")
                        else real(name, *args))
    spec = tmp_path / "study.toml"
    spec.write_text(SPEC_TOML.replace("[finetune]\nepochs = 1", "[runtime]\nlogger = \"tensorboard\"\n\n[finetune]\n"
                                      "epochs = 1"))
    db = tmp_path / "s.db"
    assert main(["search", str(spec), "--storage", f"sqlite:///{db}"]) == 2
    assert "runtime.logger: 'tensorboard' needs the tensorboard package" in capsys.readouterr().err
    assert not db.exists()


@pytest.mark.parametrize("folder", ["/tmp/elsewhere", "../up", "logs/../../up", ""])
def test_the_log_folder_stays_under_the_working_directory(folder: str) -> None:
    """A stored spec is data: it may not choose where a worker writes outside its folder."""
    from slimtune.spaces import SpecError, parse_spec

    from .conftest import digits_spec_dict

    data = digits_spec_dict()
    data["runtime"] = {"logger": "csv", "log_dir": folder}
    with pytest.raises(SpecError, match="runtime.log_dir.*a relative folder without '..'"):
        parse_spec(data)
