"""What the refinement stage did: each refined plan's short trial beside its refinement.

Run by hand, after a search with ``search.refine.epochs`` (``benchmarks/mnist_table.py``'s
presets, ``lenet300-mnist-hour`` and ``lenet5-mnist-hour``, have one)::

    .venv/bin/python benchmarks/refinement_effect.py --study table-lenet300-de63c06a \
        [--study table-lenet5-2cc4f5ef ...] [--storage sqlite:///mnist_table.db]

Reads the studies only (nothing is trained, the database is opened read-only). For every
finished refinement trial (its record's ``refines``) it prints the source trial's validation
and test accuracy and bytes beside the refinement's, and the mean change per study; writes
``benchmarks/refinement_effect.json`` and replaces the ``refinement_effect`` section of
RESULTS.md. The refinement is a fresh seed and more epochs, so its change in validation accuracy measures the short trial's luck plus the
longer training's gain; the test change, read afterwards, says which it was.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from results_md import write_section
from slimtune.spaces import SpecError
from slimtune.studies import StorageError, keys, load_existing_study, records

HERE = Path(__file__).resolve().parent


def refinement_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per COMPLETE refinement: source and refinement accuracies (fractions) and bytes."""
    trials = {r.number: r for r in records(study)}
    rows = []
    for trial in trials.values():
        if trial.refines is None or trial.state != TrialState.COMPLETE:
            continue
        source = trials[trial.refines]
        rows.append({"source": source.number, "refined": trial.number,
                     "source_val": source.val_accuracy, "source_test": source.test_accuracy,
                     "source_bytes": source.size_bytes, "val": trial.val_accuracy,
                     "test": trial.test_accuracy, "bytes": trial.size_bytes,
                     "epochs": len(trial.val_history), "source_epochs": len(source.val_history)})
    return rows


def render(results: dict[str, dict[str, Any]], command: str) -> str:
    lines = [f"Command: `{command}` ({date.today().isoformat()}; reads the studies, trains nothing)", "",
             "| study | source → refinement | epochs | validation | test | bytes |", "|---|---|---|---|---|---:|"]
    for name, result in results.items():
        for r in result["rows"]:
            lines.append(f"| `{name}` | {r['source']} → {r['refined']} | {r['source_epochs']} → {r['epochs']} | "
                         f"{100 * r['source_val']:.2f} → {100 * r['val']:.2f} % | "
                         f"{100 * r['source_test']:.2f} → {100 * r['test']:.2f} % | "
                         f"{r['source_bytes']:,} → {r['bytes']:,} |")
        if result["rows"]:
            lines.append(f"| `{name}` | **mean change ({len(result['rows'])})** | | "
                         f"{100 * result['mean_val_change']:+.3f} pt | {100 * result['mean_test_change']:+.3f} pt | |")
    lines += ["", "Teachers: " + "; ".join(f"`{n}` val {100 * r['teacher']['val_accuracy']:.2f} % / test "
                                           f"{100 * r['teacher']['test_accuracy']:.2f} %" for n, r in results.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", action="append", required=True)
    parser.add_argument("--storage", default="sqlite:///mnist_table.db")
    parser.add_argument("--out", default=str(HERE / "refinement_effect.json"))
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results: dict[str, dict[str, Any]] = {}
    for name in args.study:
        try:
            study = load_existing_study(name, args.storage)
        except (SpecError, StorageError) as exc:  # a missing study or storage: exit 2, nothing written
            parser.error(f"--study {name}: {exc}")
        rows = refinement_rows(study)
        if not rows:
            parser.error(f"--study {name}: no finished refinement trial (was search.refine.epochs set?)")
        results[name] = {"teacher": study.user_attrs[keys.TEACHER], "rows": rows,
                         "mean_val_change": statistics.mean(r["val"] - r["source_val"] for r in rows),
                         "mean_test_change": statistics.mean(r["test"] - r["source_test"] for r in rows)}
    command = (".venv/bin/python benchmarks/refinement_effect.py " + " ".join(f"--study {s}" for s in args.study)
               + f" --storage {args.storage}")
    table = render(results, command)
    print(table)
    Path(args.out).write_text(json.dumps({"date": date.today().isoformat(), "results": results}, indent=2) + "\n")
    if not args.no_results_md:
        write_section("refinement_effect", "### The refinement stage, trial by trial (`refinement_effect.py`)", table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
