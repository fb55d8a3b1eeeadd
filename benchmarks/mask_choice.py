"""The same plans, other mask and bias settings: how far the accuracy–size curve moves.

Run by hand, after ``benchmarks/mnist_table.py`` has filled its study database::

    .venv/bin/python benchmarks/mask_choice.py [--storage sqlite:///mnist_table.db]
        [--study table-lenet300-6b53ab84] [--plans 6] [--min-val 0.977]

A search mixes the effect of a setting with the luck of which plans the sampler tried. This
script removes the sampler: it takes the stored Pareto plans of a study (at least ``--min-val``
validation accuracy, up to ``--plans`` of them, smallest first) and runs each again, with the
study's own teacher, data and fine-tune budget (every trial promoted, so each gets all its
epochs), under each setting in ``SETTINGS``: plain magnitude masks with float32 biases (the
stored trials' own setting; ``BASELINE`` states it in full, ``method.prune.schedule =
"oneshot"``, ``method.prune.activation_power = 0``, ``method.quantize.bias_bits = 32``, since
the defaults are now the recipe's power 0.5 and float16 biases), activation-weighted masks
(``method.prune.activation_power`` 0.5 and 1), power 0.5 with float16 biases
(``method.quantize.bias_bits = 16``), and magnitude masks re-chosen during the base epochs
(``method.prune.schedule = "dynamic"``). Everything else (the quantizer among it) is the
study's own spec. It prints, for each plan and setting, validation and test accuracy and the
artifact's bytes, writes ``benchmarks/mask_choice.json`` and replaces the ``mask_choice``
section of RESULTS.md.
The plans were chosen as Pareto under the first setting, so the comparison favours it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable

import optuna
import torch

from mnist_table import with_settings
from results_md import write_section
from slimtune.search import load_stored_spec
from slimtune.spaces import CompressionPlan, SpecError, StudySpec
from slimtune.studies import TrialRecord, get_blob, keys, load_existing_study, open_storage, pareto_trials
from slimtune.trainers import TrialContext, build_datamodule, build_model, load_state_bytes, run_trial

HERE = Path(__file__).resolve().parent
# The plain setting every other one is compared with, stated in full (the defaults are the recipe).
BASELINE: dict[str, Any] = {"method.prune.schedule": "oneshot", "method.prune.activation_power": 0.0,
                            "method.quantize.bias_bits": 32}
SETTINGS: dict[str, dict[str, Any]] = {  # spec keys (any depth) over the study's own spec
    "magnitude, fp32 biases": dict(BASELINE),
    "activation^0.5, fp32 biases": {**BASELINE, "method.prune.activation_power": 0.5},
    "activation^1, fp32 biases": {**BASELINE, "method.prune.activation_power": 1.0},
    "activation^0.5, fp16 biases": {**BASELINE, "method.prune.activation_power": 0.5, "method.quantize.bias_bits": 16},
    "surgery (dynamic masks), fp32 biases": {**BASELINE, "method.prune.schedule": "dynamic", "method.prune.ramp": 1.0},
}


def chosen_plans(study: optuna.Study, plans: int, min_val: float) -> list[TrialRecord]:
    """The study's Pareto trials with at least ``min_val`` validation accuracy, smallest first."""
    front = (TrialRecord.of(t) for t in pareto_trials(study))
    return [r for r in front if (r.val_accuracy or 0.0) >= min_val][:plans]


PlanChange = Callable[[CompressionPlan, str], CompressionPlan]
"""``change(plan, output_layer) -> plan``: how a setting alters the stored plan (identity: none)."""


def rerun(spec: StudySpec, study: optuna.Study, chosen: list[TrialRecord],
          settings: dict[str, dict[str, Any]] | None = None,
          plan_changes: dict[str, PlanChange] | None = None) -> dict[str, Any]:
    """Each chosen Pareto plan under each of ``settings`` (``{label: {"path.to.key": value}}``
    over the study's spec, default ``SETTINGS``), the plan first altered by ``plan_changes[label]``
    when given: accuracies and bytes."""
    chosen_settings = settings if settings is not None else SETTINGS
    specs = {label: with_settings(spec, setting) for label, setting in chosen_settings.items()}  # all checked first
    storage = open_storage(spec.storage, read_only=True)
    dm = build_datamodule(spec.data)
    teacher = load_state_bytes(build_model(spec.model, load_checkpoint=False),
                               get_blob(storage, study.study_name, keys.TEACHER_BLOB) or b"")
    rows: list[dict[str, Any]] = []
    for label, ctx_spec in specs.items():
        ctx = TrialContext.create(ctx_spec, teacher, datamodule=dm)
        change = (plan_changes or {}).get(label)
        for trial in chosen:
            plan = CompressionPlan.from_dict(trial.plan)
            if change is not None:
                plan = change(plan, ctx.output_layer)
            result = run_trial(ctx, plan, seed=spec.seed + trial.number, promote=lambda accuracy, size: True)
            rows.append({"trial": trial.number, "setting": label, "val_accuracy": result.val_accuracy,
                         "test_accuracy": result.test_accuracy, "bytes": result.size_bytes,
                         "ratio": result.compression_ratio})
            print(json.dumps(rows[-1]), flush=True)
    return {"study": study.study_name, "teacher": study.user_attrs[keys.TEACHER], "rows": rows,
            "plans": [t.number for t in chosen]}


def render(result: dict[str, Any], command: str, labels: list[str] | None = None) -> str:
    labels = labels or list(SETTINGS)
    lines = [f"Command: `{command}` ({result['date']}, {result['machine']}; study `{result['study']}`, "
             f"teacher val {100 * result['teacher']['val_accuracy']:.2f} %, test "
             f"{100 * result['teacher']['test_accuracy']:.2f} %)", "",
             "| plan (trial) | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    by_key = {(r["trial"], r["setting"]): r for r in result["rows"]}
    for number in result["plans"]:
        cells = [f"{100 * by_key[(number, s)]['val_accuracy']:.2f} % / {100 * by_key[(number, s)]['test_accuracy']:.2f} % / "
                 f"{by_key[(number, s)]['bytes']:,} B" for s in labels]
        lines.append(f"| {number} | " + " | ".join(cells) + " |")
    means = []
    for s in labels:
        rows = [r for r in result["rows"] if r["setting"] == s]
        means.append(f"{100 * sum(r['val_accuracy'] for r in rows) / len(rows):.2f} % / "
                     f"{100 * sum(r['test_accuracy'] for r in rows) / len(rows):.2f} % / "
                     f"{sum(r['bytes'] for r in rows) / len(rows):,.0f} B")
    lines.append("| mean | " + " | ".join(means) + " |")
    lines += ["", "Each cell: validation accuracy / test accuracy / artifact bytes."]
    return "\n".join(lines)


def add_plan_arguments(parser: argparse.ArgumentParser, study: str, min_val: float, out: str) -> None:
    """The options every fixed-plan script shares (``mask_choice.py``, ``unit_pruning.py``)."""
    parser.add_argument("--storage", default="sqlite:///mnist_table.db")
    parser.add_argument("--study", default=study)
    parser.add_argument("--plans", type=int, default=6)
    parser.add_argument("--min-val", type=float, default=min_val)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / out))
    parser.add_argument("--no-results-md", action="store_true")


def load_plans(args: argparse.Namespace, parser: argparse.ArgumentParser, check: Callable[[], None] | None = None,
               settings: dict[str, dict[str, Any]] | None = None) -> tuple[StudySpec, optuna.Study, list[TrialRecord]]:
    """The stored spec, the study and its chosen plans, all checked (with ``check`` too, which
    raises ``ValueError``, and ``settings``, default ``SETTINGS``, applied to the spec) before any
    run or any file is written: a bad value exits 2."""
    try:
        if args.plans < 1 or args.threads < 1:
            raise ValueError(f"--plans {args.plans} / --threads {args.threads}: both must be at least 1")
        if check is not None:
            check()
        spec = load_stored_spec(args.study, args.storage)
        study = load_existing_study(args.study, args.storage)
        chosen = chosen_plans(study, args.plans, args.min_val)
        if not chosen:
            raise ValueError(f"--min-val {args.min_val}: no Pareto trial of {args.study} is that accurate")
        for setting in (settings if settings is not None else SETTINGS).values():
            with_settings(spec, setting)
    except (ValueError, SpecError) as exc:
        parser.error(str(exc))  # exit 2
    torch.set_num_threads(args.threads)
    return spec, study, chosen


def publish(result: dict[str, Any], args: argparse.Namespace, command: str, started: float, key: str,
            heading: str, labels: list[str] | None = None) -> None:
    """Stamp ``result``, write ``--out``, print the table and (unless ``--no-results-md``)
    replace the ``key`` section of RESULTS.md."""
    result.update(date=date.today().isoformat(), seconds=time.perf_counter() - started,
                  machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = render(result, command, labels)
    print(table)
    if not args.no_results_md:
        write_section(key, heading, table)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_arguments(parser, "table-lenet300-6b53ab84", 0.977, "mask_choice.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec, study, chosen = load_plans(args, parser)
    started = time.perf_counter()
    result = rerun(spec, study, chosen)
    command = (f".venv/bin/python benchmarks/mask_choice.py --storage {args.storage} --study {args.study} "
               f"--plans {args.plans} --min-val {args.min_val}")
    publish(result, args, command, started, "mask_choice", "### Mask choice and float16 biases on fixed plans")


if __name__ == "__main__":
    main()
