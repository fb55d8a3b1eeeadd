"""A fairer bar for shifted fine-tunes: the teacher trained on the same shifted images.

Run by hand, after ``benchmarks/mnist_table.py`` has filled its study database::

    .venv/bin/python benchmarks/shift_reference.py --storage sqlite:///mnist_table.db
        --study table-lenet300-06237e42 [--shift 1] [--epochs 20,44] [--threads 1]

When a study's fine-tunes shift the student's images (``finetune.augment_shift``) and its
teacher was trained without shifts, a student can beat the teacher partly because it saw
shifted images. This script measures how much: it trains the study's own teacher architecture
on the study's data, with ``teacher.augment_shift = --shift``, for each of ``--epochs`` (say
the preset's epochs, and the preset's plus a refinement's), seeded like the study's teacher.
For each such teacher it prints the test error and the study's best Pareto compression ratio
at that error and within +0.1 / +0.5 points (Pareto chosen on validation, as in
``mnist_table.py``: ``slimtune.studies.best_at_test_accuracy``), writes
``benchmarks/shift_reference.json`` and replaces the ``shift_reference`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

import optuna
import torch

from mnist_table import with_settings
from results_md import write_section
from slimtune.search import load_stored_spec
from slimtune.spaces import SpecError
from slimtune.studies import best_at_test_accuracy, load_existing_study, teacher_accuracy
from slimtune.trainers import build_datamodule, build_model, evaluate, train_teacher

HERE = Path(__file__).resolve().parent


def parse_epochs(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--epochs {text!r}: a comma-separated list of whole numbers >= 1, e.g. 20,44")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="sqlite:///mnist_table.db")
    parser.add_argument("--study", required=True)
    parser.add_argument("--shift", type=int, default=1)
    parser.add_argument("--epochs", default="20,44")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "shift_reference.json"))
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args()
    try:  # everything checked before any training or any file is written: exit 2
        epochs = parse_epochs(args.epochs)
        if not 1 <= args.shift <= 8 or args.threads < 1:
            raise ValueError(f"--shift {args.shift} must be in [1, 8] and --threads {args.threads} at least 1")
        spec = load_stored_spec(args.study, args.storage)
        study = load_existing_study(args.study, args.storage)
        stored = {split: teacher_accuracy(study, split) for split in ("val", "test")}
        if None in stored.values():
            raise ValueError(f"--study {args.study}: no teacher recorded yet")
        teachers = {n: with_settings(spec, {"teacher.epochs": n, "teacher.augment_shift": args.shift}).teacher
                    for n in epochs}
    except (ValueError, SpecError) as exc:
        parser.error(str(exc))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dm = build_datamodule(spec.data)
    rows: list[dict[str, Any]] = [{"teacher": f"the study's own ({spec.teacher.epochs} epochs, no shifts)",
                                   "test_error": 1 - stored["test"], "val_error": 1 - stored["val"]}]
    for n in epochs:
        model = train_teacher(build_model(spec.model, load_checkpoint=False), dm, teachers[n], seed=spec.seed)
        rows.append({"teacher": f"shifted by up to {args.shift} px, {n} epochs",
                     "test_error": 1 - evaluate(model, dm.test_dataloader()),
                     "val_error": 1 - evaluate(model, dm.val_dataloader())})
        print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        for label, extra in (("at", 0.0), ("within_0.1", 0.001), ("within_0.5", 0.005)):
            found = best_at_test_accuracy(study, 1 - row["test_error"] - extra)
            row[f"ratio_{label}"], row[f"bytes_{label}"], row[f"trial_{label}"] = found or (None, None, None)
    result = {"study": args.study, "shift": args.shift, "rows": rows, "date": date.today().isoformat(),
              "seconds": time.perf_counter() - started,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    command = (f".venv/bin/python benchmarks/shift_reference.py --storage {args.storage} --study {args.study} "
               f"--shift {args.shift} --epochs {args.epochs}")
    cell = lambda r, k: f"{r[f'ratio_{k}']:.1f}× ({r[f'bytes_{k}']:,} B)" if r[f"ratio_{k}"] else "—"  # noqa: E731
    lines = [f"Command: `{command}` ({result['date']}, {result['machine']}, {result['seconds'] / 60:.1f} min)", "",
             "| teacher | val error | test error | best Pareto ratio at that test error | within +0.1 pt | within +0.5 pt |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['teacher']} | {100 * r['val_error']:.2f} % | {100 * r['test_error']:.2f} % | {cell(r, 'at')} | "
              f"{cell(r, 'within_0.1')} | {cell(r, 'within_0.5')} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_results_md:
        write_section("shift_reference", "#### The bar with a shift-trained teacher (`shift_reference.py`)", table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
