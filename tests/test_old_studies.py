"""Studies written by slimtune 0.1.0 (``tests/fixtures/studies-v0.1.0.db``, kept as that release
wrote it) keep working: listed, shown, reported, exported byte for byte, evaluated as recorded,
and resumed with the same meaning (their spec read in this version's sections)."""

from __future__ import annotations

import tomllib
import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from slimtune.search import main
from slimtune.spaces import is_v01_spec, parse_spec, upgrade_stored_spec
from slimtune.studies import TrialRecord, keys, pareto_trials

from .conftest import copy_database

FIXTURE = Path(__file__).parent / "fixtures" / "studies-v0.1.0.db"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# v010-table's spec as a user of this version writes it: every setting the 0.1 spec left at a
# value that is no longer the default, written out.
TABLE_TODAY = """
[study]
name = "v010-table"
trials = 4
seed = 0
max_accuracy_drop = 0.1
feasible_drop = 0.1

[model]
preset = "mlp"
kwargs = { hidden = [16, 8] }

[data]
preset = "breast-cancer"

[teacher]
epochs = 10
lr = 2e-3
batch_size = 32

[finetune]
epochs = 1
batch_size = 32
augment_in = "all"

[method.prune]
activation_power = 0.0

[method.quantize]
quantizer = "amax"
bias_bits = 32

[space]
prune_ratio = { low = 0.0, high = 0.9 }
weight_bits = { choices = [4, 8, 32] }
rank_ratio = { low = 0.3, high = 1.0 }
unit_ratio = { fixed = 1.0 }
l1_weight = { low = 0.0, high = 0.01 }
lr = { fixed = 2e-3 }
"""


@pytest.fixture
def old(tmp_path: Path) -> str:
    return f"sqlite:///{copy_database(FIXTURE, tmp_path / 'old.db')}"


def test_old_studies_are_listed_shown_and_reported(old: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["studies", "--storage", old, "--format", "csv"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("study,finished,target") and len(listing) == 3
    assert {line.split(",")[0] for line in listing[1:]} == {"v010-digits", "v010-table"}
    for name in ("v010-digits", "v010-table"):
        assert main(["pareto", "--study", name, "--storage", old, "--format", "json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        front = pareto_trials(optuna.load_study(study_name=name, storage=old))
        assert rows and [r["trial"] for r in rows] == [t.number for t in front]
        assert [r["size_bytes"] for r in rows] == [int(t.values[1]) for t in front]
        report = tmp_path / f"{name}.html"
        assert main(["report", "--study", name, "--storage", old, "--out", str(report)]) == 0
        capsys.readouterr()
        assert name in report.read_text() and "Pareto front" in report.read_text()


def test_old_artifacts_export_byte_for_byte_and_evaluate_as_recorded(old: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    exported = 0
    for name in ("v010-digits", "v010-table"):
        study = optuna.load_study(study_name=name, storage=old)
        for trial in study.get_trials(states=(TrialState.COMPLETE,)):
            out = tmp_path / f"{name}-{trial.number}.slim"
            assert main(["export", "--study", name, "--storage", old, "--trial", str(trial.number),
                         "--out", str(out)]) == 0
            assert out.stat().st_size == int(trial.values[1])
            capsys.readouterr()
            assert main(["evaluate", str(out), "--json", "--split", "val"]) == 0
            assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(trial.values[0], abs=1e-12)
            exported += 1
    assert exported >= 5  # both studies, factorized, unit-pruned, float16-bias and lsq artifacts among them


def test_an_old_spec_reads_as_the_same_settings_in_this_versions_sections(old: str) -> None:
    stored = optuna.load_study(study_name="v010-table", storage=old).user_attrs[keys.SPEC]
    assert is_v01_spec(stored)
    upgraded = upgrade_stored_spec(stored)
    assert not is_v01_spec(upgraded)
    spec = parse_spec(upgraded)
    assert spec.search.sampler == "tpe" and spec.runtime.heartbeat_grace == 60
    assert spec.method("quantize").quantizer == "amax" and spec.method("quantize").bias_bits == 32
    assert spec.method("prune").activation_power == 0.0 and spec.space.knobs["unit_ratio"].fixed == 1.0
    assert (spec.search.seed.plans, spec.search.seed.uniform) == (0, 0)  # 0.1 had no seeds: none on resume
    # written today by hand, it is the same study: the same fingerprint
    today = parse_spec(tomllib.loads(TABLE_TODAY))
    assert today.fingerprint() == spec.fingerprint()


@pytest.mark.parametrize("name", ["v010-table", "v010-digits"])
def test_an_old_study_resumes_with_its_meaning_kept(old: str, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = optuna.load_study(study_name=name, storage=old).trials
    target = sum(t.state in FINISHED for t in before) + 2
    assert main(["resume", "--study", name, "--storage", old, "--trials", str(target), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "was written by slimtune 0.1.0" in err and "training the teacher" not in err
    study = optuna.load_study(study_name=name, storage=old)
    assert sum(t.state in FINISHED for t in study.trials) == target
    assert [(t.number, t.state, t.values) for t in study.trials[:len(before)]] == [
        (t.number, t.state, t.values) for t in before]
    new = [TrialRecord.of(t) for t in study.trials[len(before):]]
    old_params = {tuple(sorted(t.params)) for t in before if t.params}
    assert all(tuple(sorted(r.params)) in old_params for r in new)  # the same parameters are searched
    assert not is_v01_spec(study.user_attrs[keys.SPEC])  # stored again in this version's sections


def test_an_equivalent_spec_file_joins_an_old_study_without_force(old: str, tmp_path: Path) -> None:
    spec = tmp_path / "table.toml"
    spec.write_text(TABLE_TODAY)
    assert main(["search", str(spec), "--storage", old, "--trials", "5", "--quiet"]) == 0
    study = optuna.load_study(study_name="v010-table", storage=old)
    assert sum(t.state in FINISHED for t in study.trials) == 5
