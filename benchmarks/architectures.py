"""How far slimtune compresses models that are not chains, each with the default search space.

Run by hand from the repository root, after ``make test`` (or ``make demo``) once for the venv::

    .venv/bin/python benchmarks/architectures.py [--trials N] [--jobs 2] [--cases residual,transformer,...]

Each case is a model no preset has (``examples/architectures.py``) on its data, searched by
``slimtune search`` with the default space and settings (what a user gets who names only the
model and the data) apart from the budget stated per case (``CASES``): the teacher's epochs, the
fine-tune's epochs and the trial count; the regression case optimizes R² (``[objective]
metric``) on scikit-learn's diabetes table, written to a temporary CSV. One process per case,
``--jobs`` at a time, one torch thread each. It prints, per case, the teacher's validation and
test metric; what ``slimtune export --max-drop 0.005`` and ``0.01`` pick (chosen on
validation) with their ratio (the teacher's dense fp32 bytes over the artifact's bytes, measured
in the same run), bytes and test metric; the largest ratio among completed trials whose test
metric is within 1 point of the teacher's (a bound chosen on test, not a pick); and the mean
seconds per completed trial. It writes ``benchmarks/architectures.json`` and replaces the
``architectures`` section of RESULTS.md. The studies stay in ``benchmarks/architectures.db``
(``slimtune report``, ``slimtune dashboard`` on it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import optuna

from results_md import write_section
from slimtune.spaces import SpecError
from slimtune.studies import TrialRecord, teacher_accuracy, within_drop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Case:
    """One benchmark row: a model factory, its data, and the budget it is searched with."""

    name: str
    what: str
    model: str  # the [model] table, TOML
    data: str  # the [data] table, TOML ({folder}: the run's temporary folder)
    teacher_epochs: int = 30
    finetune_epochs: int = 3
    trials: int = 60
    metric: str = "accuracy"
    teacher_lr: float = 2e-3


CASES = {
    "residual": Case("residual", "residual CNN with batch norm and a projection shortcut, digits",
                     'factory = "examples.architectures:ResidualCNN"', 'preset = "digits"'),
    "transformer": Case("transformer", "2 Transformer encoder layers (width 32, 4 heads), digits rows as tokens",
                        'factory = "examples.architectures:DigitsTransformer"', 'preset = "digits"', trials=100),
    "gru": Case("gru", "Conv1d then GRU over the digits rows", 'factory = "examples.architectures:SequenceGRU"',
                'preset = "digits"'),
    "embedding": Case("embedding", "Embedding of pixel levels, two Linear layers, digits",
                      'factory = "examples.architectures:PixelEmbedding"', 'preset = "digits"'),
    "regression": Case("regression", "MLP 10-128-64-1 on scikit-learn's diabetes table (R², regression)",
                       'preset = "mlp"\nkwargs = { hidden = [128, 64] }',
                       'table = "{folder}/diabetes.csv"\ntarget = "target"', teacher_epochs=20, metric="r2",
                       teacher_lr=1e-3),
}


def spec_text(case: Case, folder: Path) -> str:
    return (f'[study]\nname = "arch-{case.name}"\ntrials = {case.trials}\nseed = 0\n\n[model]\n{case.model}\n\n'
            f"[data]\n{case.data.format(folder=folder)}\n\n[objective]\nmetric = \"{case.metric}\"\n\n"
            f"[teacher]\nepochs = {case.teacher_epochs}\nlr = {case.teacher_lr}\nbatch_size = 32\n\n"
            f"[finetune]\nepochs = {case.finetune_epochs}\nbatch_size = 32\n")


def run_case(case: Case, storage: str, folder: Path) -> float:
    """Search one case in its own process; returns its wall seconds."""
    spec = folder / f"{case.name}.toml"
    spec.write_text(spec_text(case, folder))
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "slimtune.search._cli", "search", str(spec), "--storage", storage,
                    "--threads", "1", "--quiet"], check=True, cwd=ROOT, env=env)
    return time.perf_counter() - started


def summarize(case: Case, storage: str, wall: float) -> dict[str, object]:
    study = optuna.load_study(study_name=f"arch-{case.name}", storage=storage)
    teacher_val, teacher = teacher_accuracy(study, "val"), teacher_accuracy(study, "test")
    done = [TrialRecord.of(t) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    row: dict[str, object] = {"case": case.name, "what": case.what, "metric": case.metric, "teacher_val": teacher_val,
                              "teacher_test": teacher, "teacher_epochs": case.teacher_epochs,
                              "finetune_epochs": case.finetune_epochs, "trials": len(study.trials),
                              "completed": len(done), "wall_s": round(wall, 1),
                              "s_per_trial": round(statistics.mean(t.seconds.get("total", 0) for t in done), 2)
                              if done else None}
    for points in (0.5, 1.0):
        try:  # chosen on validation, as export --max-drop picks; its test metric read afterwards
            pick = TrialRecord.of(within_drop(study, points / 100))
        except SpecError:
            row[f"pick_{points}"] = None
        else:
            row[f"pick_{points}"] = {"ratio": round(pick.compression_ratio or 0, 2), "bytes": pick.size_bytes,
                                     "trial": pick.number, "val": pick.val_accuracy, "test": pick.test_accuracy}
    fits = [t for t in done if t.test_accuracy is not None and teacher is not None
            and t.test_accuracy >= teacher - 0.01 - 1e-12]
    best = max(fits, key=lambda t: t.compression_ratio or 0, default=None)
    row["best_test_within_1.0"] = None if best is None else {
        "ratio": round(best.compression_ratio or 0, 2), "bytes": best.size_bytes, "trial": best.number,
        "test": best.test_accuracy}
    return row


def _shown(value: object, row: dict[str, object]) -> str:
    return f"R² {value:.3f}" if row["metric"] == "r2" else f"{100 * value:.2f} %"  # type: ignore[operator]


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| model | teacher val / test | `--max-drop 0.005` picks (bytes; val / test) | `--max-drop 0.01` picks "
             "(bytes; val / test) | best ratio at a test metric within 1 pt | completed / trials | s/trial |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = []
        for key in ("pick_0.5", "pick_1.0"):
            pick = row[key]
            cells.append("none" if pick is None else f"**{pick['ratio']:.1f}×** ({pick['bytes']:,} B; "
                         f"{_shown(pick['val'], row)} / {_shown(pick['test'], row)})")
        best = row["best_test_within_1.0"]
        cells.append("none" if best is None else f"{best['ratio']:.1f}× ({_shown(best['test'], row)})")
        lines.append(f"| {row['what']} | {_shown(row['teacher_val'], row)} / {_shown(row['teacher_test'], row)} | "
                     f"{cells[0]} | {cells[1]} | {cells[2]} | {row['completed']}/{row['trials']} | "
                     f"{row['s_per_trial']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=None, help="every case's trial count (default: its own)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--storage", default=f"sqlite:///{HERE / 'architectures.db'}")
    args = parser.parse_args()
    cases = [CASES[name] if args.trials is None else replace(CASES[name], trials=args.trials)
             for name in args.cases.split(",")]
    for case in cases:  # a fresh study per run (the database keeps other cases' studies)
        try:
            optuna.delete_study(study_name=f"arch-{case.name}", storage=args.storage)
        except KeyError:
            pass
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(args.jobs) as pool:
        from sklearn.datasets import load_diabetes  # a table bundled with scikit-learn: no download

        load_diabetes(as_frame=True).frame.to_csv(Path(folder) / "diabetes.csv", index=False)
        walls = list(pool.map(lambda c: run_case(c, args.storage, Path(folder)), cases))
    rows = [summarize(case, args.storage, wall) for case, wall in zip(cases, walls)]
    text = table(rows)
    print(text)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    command = "benchmarks/architectures.py" + (f" --trials {args.trials}" if args.trials else "") + f" --jobs {args.jobs}"
    (HERE / "architectures.json").write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"),
                                                         "command": command, "rows": rows}, indent=1))
    body = (f"Command: `.venv/bin/python {command}`. Machine: {machine}. Date: {time.strftime('%Y-%m-%d')}. "
            "Raw: [`architectures.json`](architectures.json).\n\n"
            "Default space and settings (what a user gets who names only the model and the data); the budget is the "
            "trials column, teacher and fine-tune epochs as in `CASES` (digits: teacher 30, fine-tune 3 per trial; "
            "regression: teacher 20), one seed. The ratio is the teacher's dense fp32 bytes over the artifact's. "
            "The picks are chosen on validation, as `slimtune export --max-drop` chooses (the smallest Pareto trial "
            "within the drop of the teacher's validation metric), and their test metric is read afterwards; the "
            "last ratio column is the largest among completed trials whose test metric is within 1 point of the "
            "teacher's (chosen on test: a bound, not a pick). Points are accuracy points on digits (360 test "
            "images: one point is 3.6 images) and 0.01 of R² on the diabetes table (89 test patients).\n\n" + text)
    write_section("architectures", "## Architectures beyond chains (`architectures.py`)", body)


if __name__ == "__main__":
    main()
