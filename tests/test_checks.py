"""The model and the data are checked before anything is written: one forward pass on a validation
batch, finite inputs and weights, non-empty splits. A failure exits 2 and creates no study, so
the corrected spec then runs without ``--force``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimtune.search import main
from slimtune.trainers import DigitsDataModule, TensorDataModule

from .conftest import SPEC_TOML


class WrongWidth(nn.Module):
    """Five outputs for ten classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class ThreeDimensional(WrongWidth):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.fc(x.flatten(1))] * 3, dim=1)


class Crashes(WrongWidth):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # (N, 1, 8, 8) into Linear(64, 5): a shape error


class NanInputs(DigitsDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.datasets["val"].tensors[0][0, 0, 0, 0] = float("nan")


class EmptyTest(DigitsDataModule):
    def __init__(self) -> None:
        super().__init__()
        x, y = self.datasets["test"].tensors
        self.datasets["test"] = torch.utils.data.TensorDataset(x[:0], y[:0])


class FloatLabels(TensorDataModule):
    def __init__(self) -> None:
        x = torch.rand(30, 1, 8, 8)
        super().__init__({split: (x, torch.zeros(30)) for split in ("train", "val", "test")})


class SplitInSetupTest(DigitsDataModule):
    """Builds its test split only when Lightning's ``setup("test")`` asks, as many data modules do."""

    def __init__(self) -> None:
        super().__init__()
        self._test = self.datasets.pop("test")

    def setup(self, stage: str) -> None:
        if stage == "test":
            self.datasets["test"] = self._test


def _spec(tmp_path: Path, model: str | None = None, data: str | None = None, extra: str = "") -> Path:
    text = SPEC_TOML
    if model:
        text = text.replace('preset = "cnn-digits"', f'factory = "tests.test_checks:{model}"{extra}')
    elif extra:
        text = text.replace('preset = "cnn-digits"', f'preset = "cnn-digits"{extra}')
    if data:
        text = text.replace('[data]\npreset = "digits"', f'[data]\nmodule = "tests.test_checks:{data}"')
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("model", "data", "message"), [
    ("WrongWidth", None, "model: 'outputs of shape (359, 5)' is not allowed; allowed: logits of shape (N, C) = "
                         "(359, C) with C > 9, the largest label"),
    ("ThreeDimensional", None, "outputs of shape (359, 3, 5)"),
    ("Crashes", None, "a forward pass on a validation batch of shape (359, 1, 8, 8)"),
    (None, "NanInputs", "validation inputs with NaN or infinite values"),
    (None, "EmptyTest", "the test split' is empty"),
    (None, "FloatLabels", "labels of dtype torch.float32"),
])
def test_a_model_or_data_that_does_not_fit_exits_2_before_any_write(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str | None, data: str | None, message: str) -> None:
    db = tmp_path / "studies.db"
    assert main(["search", str(_spec(tmp_path, model, data)), "--storage", f"sqlite:///{db}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not db.exists()
    # the corrected spec then runs: no study was created, so no --force is needed
    assert main(["search", str(_spec(tmp_path)), "--storage", f"sqlite:///{db}", "--trials", "1", "--quiet"]) == 0


def test_a_checkpoint_with_nan_weights_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slimtune.trainers import DigitsCNN

    model = DigitsCNN()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("inf")
    checkpoint = tmp_path / "bad.pt"
    torch.save(model.state_dict(), checkpoint)
    db = tmp_path / "studies.db"
    spec = _spec(tmp_path, extra=f'\ncheckpoint = "{checkpoint}"')
    assert main(["search", str(spec), "--storage", f"sqlite:///{db}", "--quiet"]) == 2
    assert "the loaded checkpoint, whose fc2.weight holds NaN or infinite values" in capsys.readouterr().err
    assert not db.exists()


def test_a_data_module_that_builds_its_test_split_in_setup_test_works(tmp_path: Path) -> None:
    db = tmp_path / "studies.db"
    spec = _spec(tmp_path, data="SplitInSetupTest")
    assert main(["search", str(spec), "--storage", f"sqlite:///{db}", "--trials", "1", "--quiet"]) == 0
