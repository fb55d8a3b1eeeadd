"""``export --onnx``: an integer ONNX file (the stored codes as INT4/INT8, unit-pruned layers
thinner) that onnxruntime runs at the trial's recorded accuracy; ``--onnx-float`` the float one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import optuna
import pytest
import torch
from onnx import TensorProto, numpy_helper
from optuna.trial import TrialState
from torch import nn

from slimtune.search import main
from slimtune.studies import get_blob, keys, open_storage
from slimtune.trainers import (
    OnnxModel, artifact_datamodule, evaluate, load_artifact, thin_units, unit_groups, unpack_codes,
)

from .conftest import SPEC_TOML, searched

STUDY = "digits-test"
# conv1 at 2 bits (INT4), the rest at 8 (INT8); every layer but the logits keeps half its units
SPEC = SPEC_TOML.replace('weight_bits = { choices = [2, 4, 8, 32] }', 'weight_bits = 8\nunit_ratio = 0.5').replace(
    "trials = 3", "trials = 2") + '\n[space.layer."conv1"]\nweight_bits = 2\n'


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return searched(tmp_path_factory.mktemp("onnx"), SPEC)


def _trial(url: str) -> optuna.trial.FrozenTrial:
    trials = optuna.load_study(study_name=STUDY, storage=url).get_trials(states=(TrialState.COMPLETE,))
    assert trials, "the digits search with a 50-point floor completes trials"
    return trials[0]


def _initializers(path: Path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def test_integer_onnx_stores_the_artifacts_codes_thinner_and_scores_as_recorded(
        db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trial = _trial(db)
    slim, integer, floats = tmp_path / "m.slim", tmp_path / "m.onnx", tmp_path / "f.onnx"
    assert main(["export", "--study", STUDY, "--storage", db, "--trial", str(trial.number), "--out", str(slim),
                 "--onnx", str(integer), "--onnx-float", str(floats)]) == 0
    out = capsys.readouterr().out
    assert "4 weight tensors as integer codes" in out and "scores val" in out

    # at least 3x smaller than the float ONNX of the same trial
    assert floats.stat().st_size >= 3 * integer.stat().st_size, (floats.stat().st_size, integer.stat().st_size)

    # both score on the validation split in onnxruntime what the trial recorded
    dm = artifact_datamodule(load_artifact(slim)[1])
    for path in (integer, floats):
        assert evaluate(OnnxModel(path), dm.val_dataloader()) == pytest.approx(trial.values[0], abs=1e-3)

    # the codes are the artifact's (INT4 for 2 bits, INT8 for 8), for the units each layer kept
    stored = unpack_codes(slim.read_bytes())
    model, _ = load_artifact(slim)
    kept = thin_units(model, next(iter(dm.val_dataloader()))[0])
    assert set(kept) == {"conv1", "conv2", "fc1"}  # fc2 (the logits) keeps its units
    tensors = _initializers(integer)
    for name, codes in stored.items():
        proto = tensors[f"{name}.codes"]
        assert proto.data_type == (TensorProto.INT4 if codes.bits <= 4 else TensorProto.INT8), name
        layer = name.rpartition(".")[0]
        rows = kept.get(layer, torch.arange(codes.codes.shape[0]))
        want = codes.codes[rows]
        if layer in ("conv2", "fc1", "fc2"):  # they read a thinned layer: its columns went too
            reader = {"conv2": "conv1", "fc1": "conv2", "fc2": "fc1"}[layer]
            block = codes.codes.shape[1] // {"conv1": 16, "conv2": 32, "fc1": 64}[reader]
            columns = (kept[reader].view(-1, 1) * block + torch.arange(block)).flatten()
            want = want[:, columns]
        assert np.array_equal(numpy_helper.to_array(proto).astype(np.int64), want.numpy()), name
        assert np.array_equal(numpy_helper.to_array(tensors[f"{name}.scales"]).flatten(), codes.scales[rows].numpy()), name
    # a unit-pruned layer is exported with the shape it kept: fc1 keeps half of its 64 units
    assert list(tensors["fc1.weight.codes"].dims) == [32, 16 * len(kept["conv2"])] and len(kept["fc1"]) == 32
    assert tensors["conv1.weight.codes"].dims[0] == len(kept["conv1"]) == 8
    assert list(_initializers(floats)["fc1.weight"].dims) == [64, 512]  # the float export stays dense


def test_an_onnx_file_that_misses_the_recorded_score_is_an_error_naming_both(
        db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import slimtune.trainers._onnx as onnx_module

    monkeypatch.setattr(onnx_module, "SCORE_TOLERANCE", -1.0)  # no score can pass
    trial = _trial(db)
    assert main(["export", "--study", STUDY, "--storage", db, "--trial", str(trial.number),
                 "--out", str(tmp_path / "m.slim"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    recorded = f"{100 * trial.values[0]:.2f}%"
    assert f"in onnxruntime against the recorded {recorded}" in err and "scores " in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


class Residual(nn.Module):
    """A stem and a block whose outputs meet at an addition, a batch norm on the sum, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.norm, self.head = nn.BatchNorm2d(6), nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.relu(self.norm(x + self.conv(torch.relu(x)))).flatten(1))


def test_thinning_cuts_units_that_meet_at_an_addition_together_and_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    net = Residual().eval()
    net.norm.running_mean.uniform_(-1, 1)
    net.norm.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        for layer in (net.stem, net.conv):
            layer.weight[[1, 4]] = 0  # units 1 and 4 are produced by nothing ...
        net.conv.weight[:, [1, 4]] = 0  # ... and read by nothing
        net.head.weight.view(3, 6, 16)[:, [1, 4]] = 0
        net.stem.weight[2] = 0  # unit 2 is zero in one producer only: it stays
    x = torch.randn(5, 1, 4, 4)
    before = net(x)
    (group,) = [g for g in unit_groups(net, x)[0] if g.blocked_by is None]
    assert group.norms == ["norm"]
    kept = thin_units(net, x)
    assert {name: index.tolist() for name, index in kept.items()} == {"stem": [0, 2, 3, 5], "conv": [0, 2, 3, 5]}
    assert (net.stem.out_channels, net.conv.in_channels, net.norm.num_features, net.head.in_features) == (4, 4, 4, 64)
    assert torch.allclose(net(x), before, atol=1e-5)


def test_a_unit_read_by_its_consumer_stays_even_with_a_zero_row() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight[1] = 0  # its output is relu(bias): a constant the next layer still reads
    assert thin_units(net) == {} and net[0].out_features == 3


def test_bench_measures_the_integer_onnx_beside_the_teacher(db: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import json

    trial = _trial(db)
    capsys.readouterr()
    assert main(["bench", "--study", STUDY, "--storage", db, "--trial", str(trial.number), "--batch", "1,32",
                 "--runs", "5", "--json"]) == 0
    teacher, row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert teacher["model"] == "teacher, fp32 ONNX" and row["model"] == f"trial {trial.number}, integer ONNX"
    study = optuna.load_study(study_name=STUDY, storage=db)
    assert teacher["val_accuracy"] == pytest.approx(study.user_attrs[keys.TEACHER]["val_accuracy"], abs=1e-3)
    assert row["val_accuracy"] == pytest.approx(trial.values[0], abs=1e-3)
    assert row["slim_bytes"] == trial.values[1] and teacher["bytes"] >= 3 * row["bytes"]
    for measured in (teacher, row):
        assert set(measured["latency_ms"]) == {"1", "32"}
        assert all(0 < cell["median"] <= cell["p90"] for cell in measured["latency_ms"].values())
        assert 0 < measured["peak_rss_mib"] < 1000  # the timing process's own memory, not this one's

    assert main(["bench", "--study", STUDY, "--storage", db, "--trial", str(trial.number), "--runs", "5"]) == 0
    assert "against the teacher, this run:" in capsys.readouterr().out
    # a .slim file alone: beside the dense fp32 ONNX of its own weights
    slim = tmp_path / "m.slim"
    assert main(["export", "--study", STUDY, "--storage", db, "--trial", str(trial.number), "--out", str(slim)]) == 0
    capsys.readouterr()
    assert main(["bench", str(slim), "--batch", "8", "--runs", "3", "--json"]) == 0
    dense, alone = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert dense["model"] == "dense fp32 ONNX of the same weights" and alone["model"] == "m.slim, integer ONNX"
    assert dense["val_accuracy"] == pytest.approx(alone["val_accuracy"], abs=1e-3) == pytest.approx(trial.values[0], abs=1e-3)
    assert alone["bytes"] == row["bytes"] and dense["bytes"] >= 3 * alone["bytes"]
    for argv in ([str(slim), "--study", STUDY], [str(slim), "--trial", "0"], ["--study", STUDY, "--storage", db], []):
        assert main(["bench", *argv]) == 2, argv
    assert "either a .slim file or --study with --trial or --max-drop" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["bench", "--study", STUDY, "--storage", db, "--trial", str(trial.number), "--batch", "1,0"])
    assert refused.value.code == 2 and "'0' is not allowed; allowed: a batch size in 1..65536" in capsys.readouterr().err


def test_a_latency_objective_makes_a_three_objective_study_with_its_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = searched(tmp_path, SPEC + '\n[objective]\ndeploy = "latency_ms"\nlatency_batch = 4\n')
    study = optuna.load_study(study_name=STUDY, storage=url)
    assert len(study.directions) == 3 and study.metric_names == ["val_accuracy", "size_bytes", "latency_ms"]
    trial = _trial(url)
    deploy = trial.user_attrs[keys.TRIAL_DEPLOY]
    assert trial.values[2] == deploy["latency_ms"] > 0 and deploy["batch"] == 4
    # onnx_bytes is the file export --onnx writes for the trial
    assert main(["export", "--study", STUDY, "--storage", url, "--trial", str(trial.number),
                 "--out", str(tmp_path / "m.slim"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert deploy["onnx_bytes"] == (tmp_path / "m.onnx").stat().st_size

    capsys.readouterr()
    assert main(["pareto", "--study", STUDY, "--storage", url]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[:6] == ["trial", "val_accuracy", "test_accuracy", "size_bytes", "onnx_bytes", "latency_ms"]
    assert main(["report", "--study", STUDY, "--storage", url, "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert 'id="deploy-objective"' in page and "Third objective: latency_ms" in page

    # the objectives are the study's: another deploy objective is refused, even with --force
    spec = tmp_path / "study.toml"
    spec.write_text(SPEC)
    assert main(["search", str(spec), "--storage", url, "--threads", "1", "--quiet", "--force"]) == 2
    assert "objective.deploy: 'none'" in capsys.readouterr().err and len(study.trials) == 2


def test_a_deploy_objective_without_the_onnx_extra_exits_2_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC + '\n[objective]\ndeploy = "onnx_bytes"\n')
    assert main(["search", str(spec), "--storage", f"sqlite:///{tmp_path / 's.db'}", "--quiet"]) == 2
    assert "objective.deploy: 'onnx_bytes'" in capsys.readouterr().err and not (tmp_path / "s.db").exists()
