"""End to end through the CLI: search into a temporary SQLite file, resume, read the front."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from slimtune.search import main
from slimtune.studies import get_blob, keys, open_storage, preset_names
from slimtune.trainers import build_model, unpack_model
from slimtune.spaces import ModelSpec

from .conftest import SPEC_TOML, without_seeds


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(without_seeds(SPEC_TOML))  # resume's trials are sampled ones, not seeds
    return path


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def test_search_resume_and_pareto(spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = _url(tmp_path)
    assert main(["search", str(spec_file), "--storage", url, "--quiet"]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3
    assert study.metric_names == ["val_accuracy", "size_bytes"]
    teacher = study.user_attrs[keys.TEACHER]
    assert 0.5 < teacher["val_accuracy"] <= 1 and 0.5 < teacher["test_accuracy"] <= 1
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete, "at least one trial should complete on digits with a 50-point floor"
    storage = open_storage(url)
    for trial in complete:
        artifact = get_blob(storage, "digits-test", keys.artifact_blob_key(trial.number))
        assert artifact is not None and len(artifact) == trial.values[1]
        assert trial.user_attrs[keys.TRIAL_RATIO] == pytest.approx(teacher["dense_bytes"] / trial.values[1])
        assert set(trial.user_attrs[keys.TRIAL_PLAN]["layers"]) == {"conv1", "conv2", "fc1", "fc2"}
        state, meta = unpack_model(artifact)
        model = build_model(ModelSpec(**meta["model"]))
        model.load_state_dict(state)
    teacher_blob = get_blob(storage, "digits-test", keys.TEACHER_BLOB)
    assert teacher_blob is not None
    capsys.readouterr()

    # resume adds trials to the same study, reusing the stored teacher (no retraining)
    assert main(["resume", "--study", "digits-test", "--storage", url, "--trials", "5", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "training the teacher" not in err
    study = optuna.load_study(study_name="digits-test", storage=url)
    assert len([t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 5
    assert study.user_attrs[keys.TEACHER] == teacher
    assert get_blob(storage, "digits-test", keys.TEACHER_BLOB) == teacher_blob
    resumed = [t.params for t in study.trials[3:]]
    assert all(p not in [t.params for t in study.trials[:3]] for p in resumed)

    assert main(["pareto", "--study", "digits-test", "--storage", url, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    front = study.best_trials
    assert sorted(r["trial"] for r in rows) == sorted(t.number for t in front)
    assert [r["size_bytes"] for r in rows] == sorted(r["size_bytes"] for r in rows)
    assert {"val_accuracy", "test_accuracy", "compression_ratio", "mean_bits", "sparsity", "fc1.weight_bits"} <= set(rows[0])

    assert main(["pareto", "--study", "digits-test", "--storage", url]) == 0
    table = capsys.readouterr().out
    assert "compression_ratio" in table and "fc1.weight_bits" not in table

    assert main(["studies", "--storage", url, "--format", "csv"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("study,finished,target")
    assert listing[1].startswith("digits-test,5,5")


def test_same_search_again_continues_and_does_not_retrain(spec_file: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    url = _url(tmp_path)
    assert main(["search", str(spec_file), "--storage", url, "--trials", "1", "--quiet"]) == 0
    assert main(["search", str(spec_file), "--storage", url, "--trials", "2", "--quiet"]) == 0
    assert capsys.readouterr().err.count("training the teacher") == 1
    study = optuna.load_study(study_name="digits-test", storage=url)
    assert len(study.trials) == 2


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        ("weight_bits = { choices = [2, 4, 8, 32] }", "weight_bits = { choices = [1, 4] }",
         "space.weight_bits.choices: 1 is not allowed; allowed: integers 2..16"),
        ("weight_bits = { choices = [2, 4, 8, 32] }", "weight_bits = { choices = [4, 33] }",
         "space.weight_bits.choices: 33 is not allowed; allowed: integers 2..16"),
        ("prune_ratio = { low = 0.2, high = 0.8 }", "prune_ratio = { low = 0.2, high = 1.0 }",
         "space.prune_ratio.high: 1.0 is not allowed; allowed: a fraction in [0, 1)"),
        ("prune_ratio = { low = 0.2, high = 0.8 }", "prune_ratio = { fixed = 1.5 }",
         "space.prune_ratio.fixed: 1.5 is not allowed; allowed: a fraction in [0, 1)"),
    ],
)
def test_bad_spec_exits_2_naming_the_key_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             before: str, after: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    assert before in SPEC_TOML
    path.write_text(SPEC_TOML.replace(before, after))
    db = tmp_path / "studies.db"
    assert main(["search", str(path), "--storage", f"sqlite:///{db}"]) == 2
    assert message in capsys.readouterr().err
    assert not db.exists()


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        ('layers', 'layers = ["conv*", "nothere"]\nprune_ratio', "space.layers: 'nothere' matches no layer"),
        ('preset = "cnn-digits"', 'factory = "no_such_pkg.models:make"', "model.factory: 'no_such_pkg.models:make' cannot be imported"),
        ('[data]\npreset = "digits"', '[data]\nmodule = "slimtune.trainers:DigitsDataModule"\nkwargs = { split_seed = "x" }', "data.module"),
    ],
)
def test_runtime_bad_input_exits_2_before_any_write(tmp_path: Path, capsys: pytest.CaptureFixture[str], replace: str,
                                                     by: str, message: str) -> None:
    text = SPEC_TOML.replace("prune_ratio", by, 1) if replace == "layers" else SPEC_TOML.replace(replace, by)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    db = tmp_path / "studies.db"
    assert main(["search", str(path), "--storage", f"sqlite:///{db}"]) == 2
    assert message in capsys.readouterr().err
    assert not db.exists()


def test_changed_spec_is_refused_unless_forced(spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = _url(tmp_path)
    assert main(["search", str(spec_file), "--storage", url, "--trials", "1", "--quiet"]) == 0
    changed = tmp_path / "changed.toml"
    changed.write_text(SPEC_TOML.replace("kd_temperature = { low = 1.0, high = 4.0 }", "kd_temperature = { fixed = 2.0 }"))
    capsys.readouterr()
    assert main(["search", str(changed), "--storage", url, "--trials", "2", "--quiet"]) == 2
    assert "differs from the study's stored spec" in capsys.readouterr().err
    assert len(optuna.load_study(study_name="digits-test", storage=url).trials) == 1
    assert main(["search", str(changed), "--storage", url, "--trials", "2", "--quiet", "--force"]) == 0


def test_resume_of_unknown_study_lists_the_known_ones(spec_file: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    url = _url(tmp_path)
    assert main(["search", str(spec_file), "--storage", url, "--trials", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["resume", "--study", "digits-tset", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "'digits-tset' does not exist" in err and "allowed: digits-test" in err


def test_preset_and_spec_file_together_is_an_error(spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", str(spec_file), "--preset", "cnn-digits"]) == 2
    assert main(["search", "--preset", "nope"]) == 2
    assert {"cnn-digits", "lenet300-mnist", "lenet5-mnist"} <= set(preset_names())  # the list grows with presets
    assert f"is not a known preset; allowed: {', '.join(preset_names())}" in capsys.readouterr().err


def test_user_model_factory_data_module_and_checkpoint(tmp_path: Path, digits_teacher,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from slimtune.trainers import evaluate

    teacher, dm = digits_teacher
    checkpoint = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), checkpoint)
    text = (SPEC_TOML.replace('[model]\npreset = "cnn-digits"',
                              f'[model]\nfactory = "slimtune.trainers:DigitsCNN"\ncheckpoint = "{checkpoint}"')
            .replace('[data]\npreset = "digits"', '[data]\nmodule = "slimtune.trainers:DigitsDataModule"\n'
                                                  'kwargs = { batch_size = 64 }'))
    spec = tmp_path / "own.toml"
    spec.write_text(text)
    url = _url(tmp_path)
    assert main(["search", str(spec), "--storage", url, "--trials", "1", "--quiet"]) == 0
    assert "training the teacher" not in capsys.readouterr().err
    info = optuna.load_study(study_name="digits-test", storage=url).user_attrs[keys.TEACHER]
    assert info["source"] == f"checkpoint {checkpoint}"
    assert info["val_accuracy"] == evaluate(teacher, dm.val_dataloader())


def test_unloadable_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC_TOML.replace('preset = "cnn-digits"', f'preset = "cnn-digits"\ncheckpoint = "{bad}"'))
    assert main(["search", str(spec), "--storage", _url(tmp_path)]) == 2
    assert "model.checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "studies.db").exists()


def test_a_deleted_study_name_starts_afresh(spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = _url(tmp_path)
    assert main(["search", str(spec_file), "--storage", url, "--trials", "1", "--quiet"]) == 0
    optuna.delete_study(study_name="digits-test", storage=url)
    assert main(["search", str(spec_file), "--storage", url, "--trials", "1", "--quiet"]) == 0
    assert capsys.readouterr().err.count("training the teacher") == 2
    assert keys.TEACHER in optuna.load_study(study_name="digits-test", storage=url).user_attrs
