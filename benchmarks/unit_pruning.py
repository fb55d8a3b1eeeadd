"""The same plans with fewer units: what ``unit_ratio`` does to bytes and accuracy.

Run by hand, after ``benchmarks/mnist_table.py`` has filled its study database::

    .venv/bin/python benchmarks/unit_pruning.py [--storage sqlite:///mnist_table.db]
        [--study table-lenet300-13484d24] [--plans 6] [--min-val 0.978] [--units 1,0.67,0.5]

Like ``mask_choice.py``, it takes the stored Pareto plans of a study (at least ``--min-val``
validation accuracy, up to ``--plans`` of them, smallest first) and runs each again with the
study's own teacher, data and fine-tune settings (every trial promoted), once per value of
``--units``: the plan's hidden layers get that ``unit_ratio`` (the layer producing the logits
keeps all its units; ``space.unit_ratio`` is fixed at that value, so that the trial context
measures the teacher's input RMS that ranks the units), everything else in the plan and the
spec stays as stored. On a study that kept every unit (``space.unit_ratio`` fixed at 1, as the
studies before units were searched did; the default space now searches it), ``1`` re-runs the
stored trials as they were, the plans were chosen as Pareto with every unit kept, and the
comparison favours 1. It prints validation and test accuracy and artifact bytes per plan and
setting, writes ``benchmarks/unit_pruning.json`` and replaces the ``unit_pruning`` section of
RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import optuna

from mask_choice import PlanChange, add_plan_arguments, load_plans, publish, rerun
from slimtune.spaces import CompressionPlan, LayerPlan


def with_units(ratio: float) -> PlanChange:
    """A plan change giving every layer but the logits layer ``unit_ratio = ratio``."""
    def change(plan: CompressionPlan, output_layer: str) -> CompressionPlan:
        layers = {name: LayerPlan({**layer, "unit_ratio": 1.0 if name == output_layer else ratio})
                  for name, layer in plan.layers.items()}
        return CompressionPlan(layers, plan.logit_temperature, **plan.globals)
    return change


def units_setting(ratio: float) -> dict[str, Any]:
    """The spec change that goes with :func:`with_units`: ``space.unit_ratio`` fixed at ``ratio``, so
    that the trial context measures the teacher's input RMS (which ranks the units) when units go."""
    return {"space.unit_ratio": {"fixed": ratio}}


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
    try:
        units = parse_units(args.units)
    except ValueError as exc:
        parser.error(str(exc))  # exit 2
    labels = [f"unit_ratio {u:g}" for u in units]
    settings = {label: units_setting(u) for label, u in zip(labels, units)}
    spec, study, chosen = load_plans(args, parser, settings=settings)
    started = time.perf_counter()
    result = rerun(spec, study, chosen, settings=settings,
                   plan_changes={label: with_units(u) for label, u in zip(labels, units)})
    result["units"] = units
    command = (f".venv/bin/python benchmarks/unit_pruning.py --storage {args.storage} --study {args.study} "
               f"--plans {args.plans} --min-val {args.min_val} --units {args.units}")
    publish(result, args, command, started, "unit_pruning", "### Fewer units on fixed plans (`unit_pruning.py`)", labels)


if __name__ == "__main__":
    main()
