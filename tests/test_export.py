"""``slimtune export`` and ``slimtune evaluate``: the file is the counted bytes, and it measures as recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState

from slimtune.search import main
from slimtune.studies import get_blob, keys, open_storage
from slimtune.trainers import (
    DigitsCNN, artifact_datamodule, check_onnx, example_batch, load_artifact, pack_model,
)

from .conftest import SPEC_TOML, searched

STUDY = "digits-test"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A finished 3-trial digits search (one torch thread, so evaluation repeats it exactly)."""
    return searched(tmp_path_factory.mktemp("export"), SPEC_TOML)


def _study(url: str) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=url)


def _complete(url: str) -> list[FrozenTrial]:
    trials = _study(url).get_trials(states=(TrialState.COMPLETE,))
    assert trials, "the digits search with a 50-point floor should complete trials"
    return trials


def _export(url: str, *args: str) -> int:
    return main(["export", "--study", STUDY, "--storage", url, *args])


def _evaluate_json(path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["evaluate", str(path), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_by_trial_writes_the_stored_bytes_and_evaluates_as_recorded(
        db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = open_storage(db, create=False)
    for trial in _complete(db):
        out = tmp_path / f"trial{trial.number}.slim"
        assert _export(db, "--trial", str(trial.number), "--out", str(out)) == 0
        data = out.read_bytes()
        assert len(data) == int(trial.values[1])
        assert data == get_blob(storage, STUDY, keys.artifact_blob_key(trial.number))
        assert f"trial {trial.number}:" in capsys.readouterr().out

        test = _evaluate_json(out, capsys)
        assert test == {"split": "test", "accuracy": trial.user_attrs[keys.TRIAL_TEST_ACCURACY],
                        "size_bytes": len(data)}
        val = _evaluate_json(out, capsys, "--split", "val")
        assert val["split"] == "val" and val["accuracy"] == trial.values[0]

    assert main(["evaluate", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"test accuracy {100 * trial.user_attrs[keys.TRIAL_TEST_ACCURACY]:.2f}%" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"trial{t.number}.slim" for t in _complete(db))


def test_max_drop_picks_the_smallest_pareto_trial_within_the_drop(
        db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = _study(db)
    teacher_val = study.user_attrs[keys.TEACHER]["val_accuracy"]
    front = study.best_trials
    smallest = min(front, key=lambda t: t.values[1])
    tightest = max(0.0, teacher_val - max(t.values[0] for t in front))  # the smallest drop that selects a trial
    within = min((t for t in front if t.values[0] >= teacher_val - tightest - 1e-12), key=lambda t: t.values[1])
    for drop, expected in ((1.0, smallest), (tightest, within)):
        out = tmp_path / "model.slim"
        capsys.readouterr()
        assert _export(db, "--max-drop", repr(drop), "--out", str(out)) == 0
        printed = capsys.readouterr().out
        assert f"chose trial {expected.number}: val {100 * expected.values[0]:.2f}%" in printed
        assert f"test {100 * expected.user_attrs[keys.TRIAL_TEST_ACCURACY]:.2f}%" in printed
        assert f"{int(expected.values[1]):,} bytes" in printed
        assert f"ratio {expected.user_attrs[keys.TRIAL_RATIO]:.1f}x" in printed
        assert out.read_bytes() == get_blob(open_storage(db), STUDY, keys.artifact_blob_key(expected.number))
        assert out.stat().st_size == int(expected.values[1])


def test_onnx_export_matches_torch_in_onnxruntime(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    import slimtune.trainers._onnx as export_module

    trial = _complete(db)[0]
    out, onnx_path = tmp_path / "m.slim", tmp_path / "m.onnx"
    capsys.readouterr()
    assert _export(db, "--trial", str(trial.number), "--out", str(out), "--onnx", str(onnx_path)) == 0
    assert "onnxruntime matches PyTorch on 359 validation inputs" in capsys.readouterr().out
    assert out.stat().st_size == int(trial.values[1])

    model, meta = load_artifact(out)
    x = example_batch(artifact_datamodule(meta))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for inputs in (x, x[:5]):  # the batch axis is dynamic
        got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
        with torch.no_grad():
            want = model(inputs).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-4
        assert (got.argmax(1) == want.argmax(1)).all()

    with torch.no_grad():
        logits = model(x)
    assert check_onnx(onnx_path, x, logits) < 1e-4
    with pytest.raises(ValueError, match="max abs diff"):
        check_onnx(onnx_path, x, logits + 0.5)
    swapped = logits.clone()
    top = logits.argmax(1)
    swapped[torch.arange(len(x)), top] = logits.min(1).values - 1  # every row's class changes
    monkeypatch.setattr(export_module, "ONNX_ATOL", 1e6)  # so that only the class check can fail
    with pytest.raises(ValueError, match=f"{len(x)} of {len(x)} inputs get a different class"):
        check_onnx(onnx_path, x, swapped)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.slim"]


def test_failed_onnx_check_exits_2_and_writes_no_file(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import slimtune.trainers._onnx as export_module

    monkeypatch.setattr(export_module, "ONNX_ATOL", -1.0)  # no difference can pass
    trial = _complete(db)[0]
    assert _export(db, "--trial", str(trial.number), "--out", str(tmp_path / "m.slim"),
                   "--onnx", str(tmp_path / "m.onnx")) == 2
    assert "fails the onnxruntime check" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _bad_trial_number(db: str) -> int:
    return len(_study(db).trials) + 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--study", "digits-tset", "--trial", "0"], "--study: 'digits-tset' does not exist"),
        (["--study", STUDY, "--trial", "BAD"], "does not exist; allowed: a complete trial of study digits-test: "),
        (["--study", STUDY, "--trial", "0", "--out", "{tmp}/no/such/folder/m.slim"],
         "points into a folder that does not exist"),
        (["--study", STUDY, "--trial", "0", "--out", "{tmp}"], "is a folder"),
        (["--study", STUDY, "--trial", "0", "--onnx", "{tmp}/m.slim"], "is the same file as --out"),
    ],
)
def test_bad_export_input_exits_2_and_writes_no_file(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    args: list[str], message: str) -> None:
    argv = ["export", "--storage", db, "--out", str(tmp_path / "m.slim")]
    argv += [a.replace("{tmp}", str(tmp_path)).replace("BAD", str(_bad_trial_number(db))) for a in args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_trial_that_is_not_complete_names_its_state_and_the_complete_ones(
        db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = _study(db)
    trial = study.ask()
    trial.set_user_attr(keys.TRIAL_FAIL_REASON, "RuntimeError: boom")
    study.tell(trial, state=TrialState.FAIL)
    complete = ", ".join(str(t.number) for t in _complete(db))
    assert _export(db, "--trial", str(trial.number), "--out", str(tmp_path / "m.slim")) == 2
    err = capsys.readouterr().err
    assert f"--trial: {trial.number} is FAIL (RuntimeError: boom) and has no artifact" in err
    assert f"allowed: a complete trial of study digits-test: {complete}" in err
    assert list(tmp_path.iterdir()) == []


def test_no_trial_within_the_drop_says_the_best_available_drop(
        db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = _study(db)
    teacher = study.user_attrs[keys.TEACHER]
    best = max(_complete(db), key=lambda t: t.values[0])
    study.set_user_attr(keys.TEACHER, {**teacher, "val_accuracy": best.values[0] + 0.05})
    try:
        assert _export(db, "--max-drop", "0.01", "--out", str(tmp_path / "m.slim")) == 2
        err = capsys.readouterr().err
        assert "--max-drop: 0.01 selects no trial; allowed: a drop of at least 0.0500" in err
        assert f"the best trial, {best.number}, has val {100 * best.values[0]:.2f}%" in err
        assert list(tmp_path.iterdir()) == []
        assert _export(db, "--max-drop", "0.05", "--out", str(tmp_path / "m.slim")) == 0  # the suggested drop works
        assert f"chose trial {best.number}:" in capsys.readouterr().out
    finally:
        study.set_user_attr(keys.TEACHER, teacher)


@pytest.mark.parametrize(
    "args",
    [[], ["--trial", "0", "--max-drop", "0.01"], ["--max-drop", "-0.1"], ["--trial", "-1"]],
)
def test_trial_and_max_drop_are_one_required_choice(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _export(db, "--out", str(tmp_path / "m.slim"), *args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--trial" in err or "--max-drop" in err
    assert list(tmp_path.iterdir()) == []


def test_evaluate_refuses_files_that_are_not_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "text.slim": (b"hello, not a model", "missing SLIM header"),
        "broken.slim": (b"SLIM\x01" + b"\x00" * 32, "is not a readable slimtune artifact"),
        "nodata.slim": (pack_model(DigitsCNN(), meta={"model": {"preset": "cnn-digits"}}), "has no data reference"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert main(["evaluate", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"artifact: '{tmp_path / name}'" in err and message in err
    assert main(["evaluate", str(tmp_path / "missing.slim")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tmp_path / "text.slim"), "--split", "train"])
    assert exc.value.code == 2
