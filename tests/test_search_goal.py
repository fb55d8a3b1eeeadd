"""benchmarks/search_goal.py: the per-layer search goal, read from search-efficiency runs split in parts."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .conftest import load_benchmark

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "search_goal.py"
TEACHER = {"val_accuracy": 0.99, "test_accuracy": 0.98, "dense_bytes": 1_000_000}


@pytest.fixture(scope="module")
def search_goal() -> ModuleType:
    """The script as a module."""
    return load_benchmark("search_goal")


def _run(hypervolume: list[float], ratios: list[float | None], trials: int = 20) -> dict[str, Any]:
    """One study's curves as search_efficiency.py stores them (every trial complete)."""
    return {"study": "s", "finished": len(hypervolume), "complete": len(hypervolume), "pruned": 0, "failed": 0,
            "points": [[99.0, 5.0 - v / 10] for v in hypervolume], "hypervolume": hypervolume,
            "ratio_curve": ratios, "best_ratio_within_0.5pt": ratios[-1] if len(ratios) >= trials else None}


def _part(runs: dict[str, dict[str, Any]], trials: int = 20, **teacher: Any) -> dict[str, Any]:
    return {"net": "lenet5", "reference": [97.0, 6.0], "teacher": {**TEACHER, **teacher},
            "budget": {"trials": trials, "finetune_epochs": 2, "max_accuracy_drop": 0.02}, "runs": runs}


def test_the_merge_examples_hold(search_goal: ModuleType) -> None:
    result = doctest.testmod(search_goal)
    assert result.failed == 0 and result.attempted >= 3


def test_the_goal_compares_means_over_the_same_seeds_at_every_budget(search_goal: ModuleType) -> None:
    # seeded: HV 2 then 3 (seed 0) and 4 then 5 (seed 1): means 3 and 4 at 10 and 20 trials; grid:
    # 3.5 then 3.6 (both seeds): missed at 10, met at 20; ratios at 20: seeded (30 + 50) / 2 = 40,
    # grid 32: 1.25x, below 1.3x
    seeded = {"0": _run([2.0] * 10 + [3.0] * 10, [10.0] * 19 + [30.0]),
              "1": _run([4.0] * 10 + [5.0] * 10, [20.0] * 19 + [50.0])}
    grid = {s: _run([3.5] * 10 + [3.6] * 10, [32.0] * 20) for s in ("0", "1")}
    merged = search_goal.merge_parts([("a.json", _part({"seeded": seeded})), ("b.json", _part({"uniform": grid}))])
    rows = search_goal.goal_rows(merged)
    assert [r["trials"] for r in rows] == [10, 20]
    assert rows[0]["hypervolume"]["seeded"] == {"mean": 3.0, "n": 2}
    assert rows[0]["hv_met"] is False and rows[0]["ratio_over_grid"] is None
    assert rows[1]["hypervolume"]["seeded"]["mean"] == 4.0 and rows[1]["hv_met"] is True
    assert rows[1]["ratio"]["seeded"]["mean"] == 40.0 and rows[1]["ratio"]["uniform"]["mean"] == 32.0
    assert rows[1]["ratio_over_grid"] == pytest.approx(1.25) and rows[1]["ratio_met"] is False
    net = {"files": ["a.json", "b.json"], "teacher": TEACHER, "trials": 20, "rows": rows,
           "seeds": {"seeded": [0, 1], "uniform": [0, 1]}}
    text = search_goal.render({"command": "x", "nets": {"lenet5": net}})
    assert "| lenet5 | 10 | 3.00 | 3.50 | **missed** | — | — | — | — |" in text
    assert "| lenet5 | 20 | 4.00 | 3.60 | met | 40.0× | 32.0× | 1.25× | **missed** |" in text

    # the grid's seed 1 cut short at 12 trials: at 20 the means are over other seeds, so no verdict
    short = {"0": grid["0"], "1": _run([3.5] * 10 + [3.6] * 2, [32.0] * 12)}
    rows = search_goal.goal_rows(search_goal.merge_parts([("a.json", _part({"seeded": seeded, "uniform": short}))]))
    assert rows[0]["hv_met"] is False and rows[1]["hypervolume"]["uniform"] == {"mean": 3.6, "n": 1}
    assert rows[1]["hv_met"] is None and rows[1]["ratio_met"] is None
    text = search_goal.render({"command": "x", "nets": {"lenet5": {**net, "rows": rows}}})
    assert "| lenet5 | 20 | 4.00 | 3.60 (n=1) | incomplete | 40.0× | 32.0× (n=1) | — | incomplete |" in text

    # a grid that found nothing within half a point is beaten by any seeded find
    empty = {s: _run([3.5] * 20, [None] * 20) for s in ("0", "1")}
    rows = search_goal.goal_rows(search_goal.merge_parts([("a.json", _part({"seeded": seeded, "uniform": empty}))]))
    assert rows[1]["ratio"]["uniform"]["mean"] == 0.0 and rows[1]["ratio_met"] is True


def test_the_script_merges_parts_and_refuses_bad_or_disagreeing_parts(tmp_path: Path) -> None:
    seeded = {"0": _run([2.0] * 20, [40.0] * 20)}
    grid = {"0": _run([1.0] * 20, [20.0] * 20)}
    files = {"a.json": _part({"seeded": seeded}),
             "b.json": _part({"uniform": grid, "seeded": seeded}),  # the same study again: accepted
             "other.json": _part({"uniform": grid}, val_accuracy=0.98),
             "twice.json": _part({"seeded": {"0": _run([9.0] * 20, [40.0] * 20)}}),
             "lists.json": _part({"uniform": [grid["0"]]}),
             "nokey.json": _part({"uniform": {"0": {k: v for k, v in grid["0"].items() if k != "hypervolume"}}}),
             "noratio.json": _part({"uniform": {"0": {k: v for k, v in grid["0"].items()
                                                      if k != "best_ratio_within_0.5pt"}}}),
             "noteacher.json": {**_part({"uniform": grid}), "teacher": None},
             "zero.json": _part({"uniform": grid}, trials=0),
             "empty.json": _part({}),
             "list.json": [1, 2]}
    for name, payload in files.items():
        (tmp_path / name).write_text(json.dumps(payload))
    (tmp_path / "bad.json").write_text("{not json")
    out = tmp_path / "goal.json"

    def script(*runs: str, to: Path = out) -> subprocess.CompletedProcess[str]:
        args = [a for r in runs for a in ("--run", r)]
        return subprocess.run([sys.executable, str(SCRIPT), "--no-results-md", "--out", str(to), *args],
                              capture_output=True, text=True, cwd=tmp_path)

    done = script("a.json,b.json")
    assert done.returncode == 0, done.stderr
    goal = json.loads(out.read_text())["nets"]["lenet5"]
    assert goal["seeds"] == {"seeded": [0], "uniform": [0]}
    assert [(r["hv_met"], r["ratio_over_grid"]) for r in goal["rows"]] == [(True, None), (True, 2.0)]
    assert "| lenet5 | 20 | 2.00 | 1.00 | met | 40.0× | 20.0× | 2.00× | met |" in done.stdout
    out.unlink()

    for runs, message in [(["a.json,other.json"], "other.json has teacher val_accuracy 0.98, a.json 0.99"),
                          (["a.json,twice.json"], "seeded seed 0 differs between a.json (study s, 20 finished)"),
                          (["a.json,bad.json"], "bad.json: cannot read it"),
                          (["a.json,missing.json"], "missing.json: cannot read it"),
                          (["a.json,lists.json"], "runs of 'uniform' are not studies by seed"),
                          (["a.json,nokey.json"], "uniform seed 0 lacks or mistypes hypervolume"),
                          (["a.json,noratio.json"], "uniform seed 0 lacks or mistypes best_ratio_within_0.5pt"),
                          (["a.json,noteacher.json"], "'teacher' lacks one of"),
                          (["zero.json"], "no whole number of 'trials' above 0"),
                          (["empty.json"], "'runs' holds no studies"),
                          (["list.json"], "it is not an object"),
                          (["a.json"], "lenet5: no uniform studies in a.json"),
                          (["b.json", "b.json"], "net lenet5 is given in two --run options"),
                          ([","], "give FILE[,FILE...]")]:
        done = script(*runs)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (runs, done.stderr)
        assert not out.exists()
    before = (tmp_path / "a.json").read_text()
    done = script("a.json,b.json", to=tmp_path / "a.json")
    assert done.returncode == 2 and "is one of the --run files" in done.stderr
    assert (tmp_path / "a.json").read_text() == before
