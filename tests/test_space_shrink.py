"""benchmarks/space_shrink.py: what shrinking the space by the sensitivity pass would cut, read from studies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from slimtune.studies import keys, open_storage, stored_sensitivity

from .conftest import load_benchmark

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "space_shrink.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--no-results-md", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def space_shrink() -> ModuleType:
    """The script as a module."""
    return load_benchmark("space_shrink")


def test_the_rules_cut_a_choice_alone_a_range_from_its_mildest_failing_point_and_tied_values(
        space_shrink: ModuleType) -> None:
    import doctest

    result = doctest.testmod(space_shrink)
    assert result.failed == 0 and result.attempted >= 8


def test_the_front_without_cut_plans_counts_what_is_left(space_shrink: ModuleType) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr(keys.TEACHER, {"val_accuracy": 0.9, "dense_bytes": 10_000})
    bits = {"fc.weight_bits": CategoricalDistribution([2, 4])}
    for val, size, width, ratio in [(0.90, 1000, 2, 10.0), (0.897, 2000, 4, 5.0), (0.85, 500, 4, 20.0)]:
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[val, size], params={"fc.weight_bits": width},
                                     distributions=bits, user_attrs={keys.TRIAL_RATIO: ratio}))
    figures = space_shrink.front_figures(study, {("fc", "weight_bits"): lambda v: v == 2}, drop=0.1)
    # front: trials 0 and 2 (trial 1 is larger and worse than 0); trial 0 holds the cut 2 bits
    assert {k: figures[k] for k in ("complete", "cut", "pareto", "pareto_cut")} == {
        "complete": 3, "cut": 1, "pareto": 2, "pareto_cut": 1}
    # reference (80 points, log10 10 000 = 4): 10 x 1 + 5 x (3 - log10 500) with all plans; without
    # trial 0, 9.7 x (4 - log10 2000) + 5 x (log10 2000 - log10 500)
    assert figures["hv"] == pytest.approx(10 + 5 * 0.30103, abs=1e-4)
    assert figures["hv_without"] == pytest.approx(9.7 * 0.69897 + 5 * 0.60206, abs=1e-4)
    assert (figures["ratio"], figures["ratio_without"]) == (10.0, 5.0)  # trial 2 is 5 points below


def test_on_a_seeded_study_every_trial_holding_a_failing_bit_width_is_cut(digits_study_db: Path,
                                                                           tmp_path: Path) -> None:
    url, out = f"sqlite:///{digits_study_db}", tmp_path / "shrink.json"
    # this study's floor is 50 points: thresholds from 1 point up, so that the pass fails some values
    done = _run("--storage", url, "--pass-study", "digits-test", "--study", "digits-test", "--label", "d",
                "--multiples", "0.02,0.2,1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())["results"]["d"]
    sensitivity = stored_sensitivity(open_storage(url, read_only=True), "digits-test")
    base = sensitivity["base_score"]
    drops = [base - p["score"] for e in sensitivity["layers"].values() for p in e["points"]]
    complete = [t for t in optuna.load_study(study_name="digits-test", storage=url).trials
                if t.state == TrialState.COMPLETE]
    assert result["measured_points"] == len(drops)
    cuts = [row["cut_points"] for row in result["rows"]]
    assert cuts == sorted(cuts, reverse=True) and cuts[0] > 0  # a higher threshold never cuts more
    for row in result["rows"]:
        (figures,) = row["studies"]
        assert figures["complete"] == len(complete)
        assert row["cut_points"] >= sum(d > row["threshold"] for d in drops)  # a range cuts stronger points too
        failing = {(layer, p["value"]) for layer, e in sensitivity["layers"].items() for p in e["points"]
                   if p["knob"] == "weight_bits" and base - p["score"] > row["threshold"]}
        holding = [t for t in complete if any((k.rsplit(".", 1)[0], v) in failing
                                              for k, v in t.params.items() if k.endswith(".weight_bits"))]
        assert figures["cut"] >= len(holding)
    assert result["rows"][0]["studies"][0]["cut"] > 0
    assert "cut where one layer alone loses more than" in done.stdout


def test_bad_input_exits_2_and_leaves_the_results_file_alone(digits_study_db: Path, tmp_path: Path) -> None:
    url, out = f"sqlite:///{digits_study_db}", tmp_path / "shrink.json"
    base = ["--storage", url, "--out", str(out)]
    for extra, message in [(["--pass-study", "digits-test", "--study", "nope"], "--study nope: no such study"),
                           (["--pass-study", "nope", "--study", "digits-test"], "--study nope: no such study"),
                           (["--pass-study", "digits-test", "--study", "digits-test", "--multiples", "0,x"],
                            "--multiples '0,x'")]:
        done = _run(*base, *extra)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not out.exists()
    out.write_text("not json")
    done = _run(*base, "--pass-study", "digits-test", "--study", "digits-test")
    assert done.returncode == 2 and "not a space_shrink.py results file" in done.stderr
    assert out.read_text() == "not json"
    broken = json.dumps({"commands": {"old": "x"}, "results": {"old": {"rows": []}}})
    out.write_text(broken)  # a results file whose older entry this script did not write
    done = _run(*base, "--pass-study", "digits-test", "--study", "digits-test")
    assert done.returncode == 2 and "an entry in it is not one this script wrote" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and out.read_text() == broken
