"""The per-layer search goal, read from finished search-efficiency runs: seeded search against the grid.

Issue 19's goal: seeded per-layer search at or above the uniform grid's hypervolume at every
budget on every net, and at least 1.3x the grid's best compression ratio within 0.5 validation
points of the teacher. ``search_efficiency.py`` measures one net per run; a run too long for one
sitting is split (a seed, or a method, at a time) and each part writes its own JSON. This script
trains nothing: it merges the parts of one net (every file must name the same net, teacher,
budget, accuracy floor and grid, and a study found in two files must hold the same points),
recomputes the means with ``search_efficiency.summarize`` and prints one table for every net, at
10, 20, 40 ... trials. A verdict is given only where the seeded search and the grid have every
seed of the net at that budget.

Run by hand::

    .venv/bin/python benchmarks/search_goal.py \\
        --run benchmarks/search_efficiency_calibrated_n80.json,benchmarks/search_efficiency_random_n80.json \\
        --run benchmarks/search_efficiency_lenet5_calibrated.json,benchmarks/search_efficiency_lenet5_calibrated_s2.json

Writes ``benchmarks/search_goal.json`` (``--out``) and the ``search_goal`` section of
``benchmarks/RESULTS.md`` (not with ``--no-results-md``). Bad input (a missing or malformed
file, parts on another teacher, one study with two results, a net without the seeded search or
the grid) exits 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from results_md import RESULTS_MD, write_section
from search_efficiency import checkpoints, summarize

HERE = Path(__file__).resolve().parent
RATIO_GOAL = 1.3  # "at least 1.3x the grid's best ratio within 0.5 points"
METHOD_ORDER = ("seeded", "uniform", "tpe", "random", "nsga2", "gp")
# What every part of one net must agree on: the same net, teacher, budget, floor and grid.
SHARED_BUDGET = ("trials", "finetune_epochs", "max_accuracy_drop", "uniform_grid", "uniform_fixed")
SHARED_TEACHER = ("val_accuracy", "test_accuracy", "dense_bytes")
# A stored study's fields this script reads, and their JSON types.
RUN_FIELDS = {"finished": int, "complete": int, "pruned": int, "failed": int, "points": list,
              "hypervolume": list, "ratio_curve": list}


def merge_parts(parts: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One payload of the studies of ``parts`` (file name, checked payload), if they agree.

    >>> run = {"study": "s", "finished": 1, "points": [[99.0, 4.0]], "hypervolume": [1.0]}
    >>> part = {"net": "lenet5", "budget": {"trials": 1}, "teacher": {"val_accuracy": 0.99},
    ...         "reference": [97.0, 6.2], "runs": {"seeded": {"0": run}}}
    >>> other = {**part, "runs": {"uniform": {"0": run}, "seeded": {"0": run}}}
    >>> sorted(merge_parts([("a.json", part), ("b.json", other)])["runs"])
    ['seeded', 'uniform']
    >>> merge_parts([("a.json", part), ("c.json", {**part, "reference": [96.0, 6.2]})])
    Traceback (most recent call last):
    ...
    ValueError: lenet5: c.json has reference [96.0, 6.2], a.json [97.0, 6.2]: merge only runs on one teacher, budget, floor and grid
    """
    first_name, first = parts[0]
    runs: dict[str, dict[str, Any]] = {}
    origin: dict[tuple[str, str], str] = {}
    for name, payload in parts:
        for field, mine, theirs in _shared_fields(payload, first):
            if mine != theirs:
                raise ValueError(f"{first['net']}: {name} has {field} {mine!r}, {first_name} {theirs!r}: merge only "
                                 "runs on one teacher, budget, floor and grid")
        for method, seeds in payload["runs"].items():
            for seed, run in seeds.items():
                known = runs.setdefault(method, {}).get(seed)
                if known is not None and known["points"] != run["points"]:
                    raise ValueError(f"{first['net']}: {method} seed {seed} differs between {origin[method, seed]} "
                                     f"(study {known.get('study')}, {known['finished']} finished) and {name} (study "
                                     f"{run.get('study')}, {run['finished']} finished): one study, two results")
                runs[method][seed] = run
                origin.setdefault((method, seed), name)
    seeds = sorted({int(seed) for by_seed in runs.values() for seed in by_seed})
    return {"net": first["net"], "teacher": first["teacher"], "reference": first["reference"],
            "budget": {"trials": first["budget"]["trials"], "seeds": seeds},
            "runs": {m: runs[m] for m in sorted(runs, key=_method_rank)}}


def _shared_fields(payload: dict[str, Any], first: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    fields = [("net", payload["net"], first["net"]), ("reference", payload.get("reference"), first.get("reference"))]
    fields += [(f"budget {key}", payload["budget"].get(key), first["budget"].get(key)) for key in SHARED_BUDGET]
    fields += [(f"teacher {key}", payload["teacher"].get(key), first["teacher"].get(key)) for key in SHARED_TEACHER]
    return fields


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def goal_rows(merged: dict[str, Any]) -> list[dict[str, Any]]:
    """Per budget: each method's mean hypervolume and best ratio within 0.5 point, and the goal.

    A ratio at the full budget is the studies' final best ratio; before it, the ratio after that
    many finished trials. A verdict (``hv_met``, ``ratio_met``) is ``None`` unless the seeded
    search and the grid both have every seed of the net at that budget, so both means are over
    the same seeds. A grid that found nothing within 0.5 point (0x) is beaten by any seeded find.
    """
    table = summarize(merged)
    trials, nseeds = merged["budget"]["trials"], len(merged["budget"]["seeds"])
    rows = []
    for budget in checkpoints(trials):
        row: dict[str, Any] = {"trials": budget, "hypervolume": {}, "ratio": {}}
        for method, stats in table.items():
            ratio = stats["best_ratio_within_0.5pt"] if budget == trials else stats["ratio"].get(str(budget))
            row["hypervolume"][method] = _mean(stats["hypervolume"].get(str(budget)))
            row["ratio"][method] = _mean(ratio) if budget >= 20 else None
        hv, ratio = row["hypervolume"], row["ratio"]
        paired = all(hv.get(m) is not None and hv[m]["n"] == nseeds for m in ("seeded", "uniform"))
        row["hv_met"] = hv["seeded"]["mean"] >= hv["uniform"]["mean"] if paired else None
        row["ratio_over_grid"], row["ratio_met"] = None, None
        if paired and ratio.get("seeded") is not None and ratio.get("uniform") is not None:
            seeded_ratio, grid_ratio = ratio["seeded"]["mean"], ratio["uniform"]["mean"]
            row["ratio_over_grid"] = seeded_ratio / grid_ratio if grid_ratio > 0 else None
            row["ratio_met"] = (seeded_ratio >= RATIO_GOAL * grid_ratio) if grid_ratio > 0 else seeded_ratio > 0
        rows.append(row)
    return rows


def _mean(stat: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if not stat else {"mean": stat["mean"], "n": stat["n"]}


def render(payload: dict[str, Any]) -> str:
    """The goal table in Markdown, one block of rows per net."""
    methods = [m for m in METHOD_ORDER if any(m in net["seeds"] for net in payload["nets"].values())]
    lines = [f"Command: `{payload['command']}` (reads the runs' JSON, trains nothing)", "",
             "| net | trials | " + " | ".join(f"HV {_short(m)}" for m in methods) + " | HV goal | "
             + " | ".join(f"ratio {_short(m)}" for m in methods) + " | seeded ÷ grid | ratio goal |",
             "|---|---:|" + "---:|" * len(methods) + "---|" + "---:|" * (len(methods) + 1) + "---|"]
    for net_name, net in payload["nets"].items():
        nseeds = len({s for seeds in net["seeds"].values() for s in seeds})
        for row in net["rows"]:
            hv = [_value(row["hypervolume"].get(m), "{:.2f}", nseeds) for m in methods]
            ratio = [_value(row["ratio"].get(m), "{:.1f}×", nseeds) for m in methods]
            over = "—" if row["ratio_over_grid"] is None else f"{row['ratio_over_grid']:.2f}×"
            ratio_verdict = "—" if row["trials"] < 20 else _verdict(row["ratio_met"])
            lines.append(f"| {net_name} | {row['trials']} | " + " | ".join(hv) + f" | {_verdict(row['hv_met'])} | "
                         + " | ".join(ratio) + f" | {over} | {ratio_verdict} |")
    lines += ["", "HV: mean hypervolume over the seeds (points × decades, each net's own reference: the "
              "accuracy floor and the dense bytes); ratio: mean best compression ratio within 0.5 validation "
              f"points of the teacher, from 20 trials. Goal: seeded HV at or above the grid's, and seeded ratio at "
              f"least {RATIO_GOAL}× the grid's, judged on the unrounded means and only where both have every seed "
              "of the net at that budget (else 'incomplete'). (n=k): only k of the net's seeds for that method "
              "ran or reached that budget. Parts merged per net:"]
    for net_name, net in payload["nets"].items():
        seeds = "; ".join(f"{_short(m)} {', '.join(map(str, s))}" for m, s in net["seeds"].items())
        lines.append(f"- {net_name}: {', '.join(f'`{f}`' for f in net['files'])} (teacher val "
                     f"{100 * net['teacher']['val_accuracy']:.2f} %; seeds: {seeds})")
    return "\n".join(lines)


def _short(method: str) -> str:
    return {"uniform": "grid", "tpe": "TPE", "nsga2": "NSGA-II", "gp": "GP"}.get(method, method)


def _value(stat: dict[str, Any] | None, fmt: str, nseeds: int) -> str:
    if stat is None:
        return "—"
    return fmt.format(stat["mean"]) + (f" (n={stat['n']})" if stat["n"] < nseeds else "")


def _verdict(met: bool | None) -> str:
    return "incomplete" if met is None else ("met" if met else "**missed**")


def read_part(path: Path) -> dict[str, Any]:
    """A search-efficiency JSON whose fields this script reads are there and of the right type,
    or ``ValueError`` naming the file and what is wrong with it."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as a search_efficiency.py JSON ({exc})") from None
    problem = _shape_problem(payload)
    if problem:
        raise ValueError(f"{path}: not a search_efficiency.py JSON: {problem}")
    return payload


def _shape_problem(payload: Any) -> str | None:
    """What is missing or mistyped in a search-efficiency payload, or ``None``."""
    if not isinstance(payload, dict):
        return "it is not an object"
    if not isinstance(payload.get("net"), str):
        return "'net' is not a name"
    budget, teacher, runs = payload.get("budget"), payload.get("teacher"), payload.get("runs")
    if not isinstance(budget, dict) or type(budget.get("trials")) is not int or budget["trials"] < 1:
        return "'budget' has no whole number of 'trials' above 0"
    if not isinstance(teacher, dict) or not all(_number(teacher.get(k)) for k in SHARED_TEACHER):
        return f"'teacher' lacks one of {', '.join(SHARED_TEACHER)}"
    if not isinstance(runs, dict) or not runs:
        return "'runs' holds no studies"
    for method, by_seed in runs.items():
        if not isinstance(by_seed, dict) or not by_seed:
            return f"runs of {method!r} are not studies by seed"
        for seed, run in by_seed.items():
            if not seed.isdigit():
                return f"{method} has a seed {seed!r} that is not a whole number"
            if not isinstance(run, dict):
                return f"{method} seed {seed} is not a study"
            wrong = [k for k, kind in RUN_FIELDS.items() if type(run.get(k)) is not kind]
            best = run.get("best_ratio_within_0.5pt", "missing")
            if wrong or not (best is None or _number(best)):
                return f"{method} seed {seed} lacks or mistypes {', '.join(wrong) or 'best_ratio_within_0.5pt'}"
            if not all(_number(v) for v in run["hypervolume"]) \
                    or not all(v is None or _number(v) for v in run["ratio_curve"]):
                return f"{method} seed {seed} has a hypervolume or ratio that is not a number"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build(run_files: list[str], out: Path) -> dict[str, Any]:
    """The goal payload of every ``--run`` (a net's files, comma-separated); ``ValueError`` on bad input."""
    nets: dict[str, Any] = {}
    for text in run_files:
        paths = [Path(f) for f in text.split(",") if f]
        if not paths:
            raise ValueError(f"--run {text!r}: give FILE[,FILE...], a net's search_efficiency.py JSON files")
        if any(p.resolve() == out.resolve() for p in paths):
            raise ValueError(f"--out {out} is one of the --run files: name another --out")
        merged = merge_parts([(str(p), read_part(p)) for p in paths])
        name = merged["net"]
        if name in nets:
            raise ValueError(f"net {name} is given in two --run options: give all its files in one")
        missing = [m for m in ("seeded", "uniform") if m not in merged["runs"]]
        if missing:
            raise ValueError(f"{name}: no {' or '.join(missing)} studies in {text}: the goal compares the seeded "
                             "search with the uniform grid")
        nets[name] = {"files": [_shown(p) for p in paths], "teacher": merged["teacher"],
                      "trials": merged["budget"]["trials"],
                      "seeds": {m: sorted(int(s) for s in by_seed) for m, by_seed in merged["runs"].items()},
                      "rows": goal_rows(merged)}
    return {"nets": nets}


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True,
                        help="FILE[,FILE...]: one net's search_efficiency.py JSON files (repeat per net)")
    parser.add_argument("--out", default=str(HERE / "search_goal.json"))
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    try:
        payload = build(args.run, out)
    except ValueError as exc:
        print(f"search_goal.py: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    payload["command"] = shlex.join([".venv/bin/python", "benchmarks/search_goal.py", *sys.argv[1:]])
    text = render(payload)
    tmp = out.with_name(out.name + ".tmp")
    try:  # the JSON goes in place last, so a failed write leaves neither file changed
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        if not args.no_results_md:
            write_section("search_goal", "## The per-layer search goal (`search_goal.py`)", text)
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        where = out if args.no_results_md else f"{out} or {RESULTS_MD}"
        print(f"search_goal.py: cannot write {where} ({exc})", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)


if __name__ == "__main__":
    main()
