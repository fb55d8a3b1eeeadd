"""The same plans with and without a moving average of the weights (``finetune.weight_ema``).

Run by hand, after ``benchmarks/mnist_table.py`` has filled its study database::

    .venv/bin/python benchmarks/weight_average.py [--storage sqlite:///mnist_table.db]
        [--study table-lenet5-2cc4f5ef --study table-lenet300-de63c06a] [--plans 6] [--min-val 0.98]
        [--decays 0,0.998]

Like ``mask_choice.py``, it takes each study's stored Pareto plans (at least ``--min-val``
validation accuracy, up to ``--plans`` of them, smallest first) and runs each again with the
study's own teacher, data and fine-tune settings (every trial promoted), once per value of
``--decays`` as ``finetune.weight_ema`` (0: no average, which re-runs the stored trials as
they were, same seed). It prints validation and test accuracy and artifact bytes per plan and
decay, writes ``benchmarks/weight_average.json`` and replaces the ``weight_average`` section of
RESULTS.md with one table per study. The plans were chosen as Pareto without an average, so
the comparison favours 0.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import optuna

from mask_choice import add_plan_arguments, load_plans, render, rerun
from results_md import write_section


def parse_decays(text: str) -> list[float]:
    """``"0,0.998"`` -> ``[0.0, 0.998]``; each 0 (off) or in (0, 1)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--decays {text!r}: expected comma-separated decays, 0 or in (0, 1), e.g. 0,0.998") from None
    bad = [v for v in values if not 0 <= v < 1]
    if bad or not values:
        raise ValueError(f"--decays {text!r}: every value must be 0 (off) or in (0, 1), got {bad or 'none'}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], conflict_handler="resolve")
    add_plan_arguments(parser, "", 0.98, "weight_average.json")
    parser.add_argument("--study", action="append", dest="studies", default=None,
                        help="a study to read plans from (repeat for more)")
    parser.add_argument("--decays", default="0,0.998")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = args.studies or ["table-lenet5-2cc4f5ef", "table-lenet300-de63c06a"]
    try:
        decays = parse_decays(args.decays)
    except ValueError as exc:
        parser.error(str(exc))  # exit 2
    labels = ["no average" if d == 0 else f"weight_ema {d:g}" for d in decays]
    settings = {label: {"finetune.weight_ema": d} for label, d in zip(labels, decays)}
    loaded = []
    for name in studies:  # every study checked before any run: a bad one exits 2 and writes nothing
        args.study = name
        loaded.append(load_plans(args, parser, settings=settings))
    started = time.perf_counter()
    results, tables = [], []
    for spec, study, chosen in loaded:
        result = rerun(spec, study, chosen, settings=settings)
        result.update(date=date.today().isoformat(), machine=f"{args.threads} torch thread(s)")
        results.append(result)
        command = (f".venv/bin/python benchmarks/weight_average.py --storage {args.storage} --study {study.study_name} "
                   f"--plans {args.plans} --min-val {args.min_val} --decays {args.decays}")
        tables.append(render(result, command, labels))
    Path(args.out).write_text(json.dumps({"decays": decays, "seconds": time.perf_counter() - started,
                                          "results": results}, indent=2) + "\n")
    text = "\n\n".join(tables)
    print(text)
    if not args.no_results_md:
        write_section("weight_average", "#### A moving average of the weights on fixed plans (`weight_average.py`)", text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
