"""Device settings reach Lightning's Trainer: mixed precision runs (bfloat16 on the CPU), a device
the machine lacks is refused before anything is written, and local workers get a GPU each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.search import main, worker_device
from slimtune.trainers import DigitsDataModule, build_model, evaluate, quiet_trainer
from slimtune.spaces import ModelSpec
from slimtune.studies import keys

from .conftest import SPEC_TOML


def test_the_runtime_settings_are_the_trainers() -> None:
    from types import SimpleNamespace

    trainer = quiet_trainer(1, seed=0, runtime=SimpleNamespace(accelerator="cpu", precision="bf16-mixed"))
    assert type(trainer.accelerator).__name__ == "CPUAccelerator"
    assert trainer.precision == "bf16-mixed"


def test_the_sensitivity_pass_evaluates_on_the_device_the_trainer_picks() -> None:
    from types import SimpleNamespace

    from slimtune.trainers._lightning import runtime_device

    for accelerator in ("auto", "cpu"):  # "gpu" and "mps" where the machine has one
        runtime = SimpleNamespace(accelerator=accelerator, precision="32-true")
        assert runtime_device(runtime).type == quiet_trainer(1, seed=0, runtime=runtime).strategy.root_device.type


@pytest.mark.parametrize("mps", [False, True])
@pytest.mark.parametrize("cuda", [False, True])
def test_the_pass_device_follows_lightnings_order_on_any_machine(monkeypatch: pytest.MonkeyPatch, mps: bool,
                                                                 cuda: bool) -> None:
    from types import SimpleNamespace

    import lightning.fabric.accelerators as fabric
    import lightning.pytorch.accelerators as accelerators
    from lightning.fabric.utilities.device_parser import _select_auto_accelerator
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    from slimtune.trainers._lightning import runtime_device

    for module in (fabric, accelerators):  # a machine with an Apple GPU, a CUDA GPU, both or neither
        monkeypatch.setattr(module.MPSAccelerator, "is_available", staticmethod(lambda: mps))
        monkeypatch.setattr(module.CUDAAccelerator, "is_available", staticmethod(lambda: cuda))
    monkeypatch.setattr(fabric.XLAAccelerator, "is_available", staticmethod(lambda: False))
    assert runtime_device(SimpleNamespace(accelerator="auto")).type == _select_auto_accelerator()
    if mps or cuda:
        assert runtime_device(SimpleNamespace(accelerator="gpu")).type == \
            _AcceleratorConnector._choose_gpu_accelerator_backend()


def test_a_search_in_bfloat16_mixed_precision_measures_the_stored_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = DigitsDataModule()
    model = build_model(ModelSpec(preset="cnn-digits"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    study = slimtune.search(model.eval(), data, study="bf16", storage=f"sqlite:///{tmp_path / 's.db'}", trials=2,
                            threads=1, max_accuracy_drop=0.5, finetune={"epochs": 1, "batch_size": 64},
                            runtime={"accelerator": "cpu", "precision": "bf16-mixed"},
                            space={"weight_bits": {"choices": [4, 8]}, "lr": {"fixed": 2e-3}})
    small, record = study.best(max_drop=0.5)
    assert evaluate(small, data.val_dataloader()) == pytest.approx(record.val_accuracy, abs=1e-12)
    assert study.optuna_study.user_attrs[keys.SPEC]["runtime"]["precision"] == "bf16-mixed"
    assert len(study.trials()) == 2


def test_a_gpu_this_machine_lacks_is_refused_before_anything_is_written(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one, here too
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC_TOML + '\n[runtime]\naccelerator = "gpu"\n')
    assert main(["search", str(spec), "--storage", f"sqlite:///{tmp_path / 's.db'}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "runtime.accelerator: 'gpu' finds no CUDA GPU here; allowed: \"auto\" or \"cpu\" on this machine" in err
    assert "Traceback" not in err and not (tmp_path / "s.db").exists()
    spec.write_text(SPEC_TOML + '\n[runtime]\naccelerator = "cpu"\nprecision = "16-mixed"\n')
    assert main(["search", str(spec), "--storage", f"sqlite:///{tmp_path / 's.db'}", "--quiet"]) == 2
    assert "runtime.precision: '16-mixed' needs a GPU" in capsys.readouterr().err


def test_local_workers_take_the_visible_gpus_in_turn() -> None:
    assert [worker_device(n, visible="1,3") for n in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "1"}, {"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert worker_device(5, visible="2") == {} and worker_device(0, count=0) == {}
