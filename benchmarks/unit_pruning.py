"""The same plans with fewer units: what ``unit_ratio`` does to bytes and accuracy.

Run by hand, after ``benchmarks/mnist_table.py`` has filled its study database::

    .venv/bin/python benchmarks/unit_pruning.py [--storage sqlite:///mnist_table.db]
        [--study table-lenet300-13484d24] [--plans 6] [--min-val 0.978] [--units 1,0.67,0.5]

Like ``mask_choice.py``, it takes the stored Pareto plans of a study (at least ``--min-val``
validation accuracy, up to ``--plans`` of them, smallest first) and runs each again with the
study's own teacher, data and fine-tune settings (every trial promoted), once per value of
``--units``: the plan's hidden layers get that ``unit_ratio`` (the layer producing the logits
keeps all its units), everything else in the plan stays as stored. ``1`` re-runs the stored
trials as they were. It prints validation and test accuracy and artifact bytes per plan and
setting, writes ``benchmarks/unit_pruning.json`` and replaces the ``unit_pruning`` section of
RESULTS.md. The plans were chosen as Pareto with every unit kept, so the comparison favours 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import optuna

from mask_choice import add_plan_arguments, load_plans, publish, rerun
from slimtune.spaces import CompressionPlan


def with_units(ratio: float):  # type: ignore[no-untyped-def]
    """A plan change giving every layer but the logits layer ``unit_ratio = ratio``."""
    def change(plan: CompressionPlan, output_layer: str) -> CompressionPlan:
        return dataclasses.replace(plan, layers={
            name: dataclasses.replace(layer, unit_ratio=1.0 if name == output_layer else ratio)
            for name, layer in plan.layers.items()})
    return change


def parse_units(text: str) -> list[float]:
    """``"1,0.5"`` -> ``[1.0, 0.5]``; each in (0, 1]."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--units {text!r}: expected comma-separated fractions in (0, 1], e.g. 1,0.67,0.5") from None
    bad = [v for v in values if not 0 < v <= 1]
    if bad or not values:
        raise ValueError(f"--units {text!r}: every value must be a fraction in (0, 1], got {bad or 'none'}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_arguments(parser, "table-lenet300-13484d24", 0.978, "unit_pruning.json")
    parser.add_argument("--units", default="1,0.67,0.5")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    units: list[float] = []

    def check_units() -> None:
        units.extend(parse_units(args.units))

    spec, study, chosen = load_plans(args, parser, check=check_units)
    # a unit_ratio below 1 in the space makes the trial context measure the teacher's input RMS
    knob = dataclasses.replace(spec.space.knobs["unit_ratio"], fixed=min(units))
    spec = dataclasses.replace(spec, space=dataclasses.replace(spec.space, knobs={**spec.space.knobs, "unit_ratio": knob}))
    labels = [f"unit_ratio {u:g}" for u in units]
    started = time.perf_counter()
    result = rerun(spec, study, chosen, settings={label: {} for label in labels},
                   plan_changes={label: with_units(u) for label, u in zip(labels, units)})
    result["units"] = units
    command = (f".venv/bin/python benchmarks/unit_pruning.py --storage {args.storage} --study {args.study} "
               f"--plans {args.plans} --min-val {args.min_val} --units {args.units}")
    publish(result, args, command, started, "unit_pruning", "### Fewer units on fixed plans (`unit_pruning.py`)", labels)


if __name__ == "__main__":
    main()
