"""Would shrinking the space by the sensitivity pass have cost the front? Read from finished studies.

Issue 19 asks to "let the space shrink where sensitivities say a layer tolerates nothing (e.g. bit
widths that alone cost more than the floor)". This script measures that rule on searches that
already ran, before anyone builds it: for each threshold (a multiple of the study's floor,
``max_accuracy_drop``), every measured value of a layer's knob whose single-layer drop in the
stored pass exceeds it is *cut* (a bit width alone; for a range knob, every value from the
mildest failing one to the strong end; a point the pass could not score fails at every
threshold), and the script counts the Pareto plans that hold a cut value, and the final
hypervolume and best ratio within half a point of the plans left. A cut plan is one the shrunk
space could not have proposed; what the sampler would have found instead is not measured (so the
figures "without" are what the plans left reach, not what the shrunk search would have reached).
Values between a passing and a failing grid point are kept: the most lenient reading of the rule.
Run by hand::

    .venv/bin/python benchmarks/space_shrink.py --storage sqlite:////tmp/f80/se.db \\
        --pass-study se-seeded-n80-s0 --study se-seeded-n80-s0 --study se-tpe-n80-s0 [--label NAME]

Reads the studies only (nothing is trained). Every study must share the pass study's teacher,
floor and space (the benchmark's per-layer searches of one net do). Prints the tables, adds the
``--label`` entry to ``benchmarks/space_shrink.json`` (``--out``) and replaces the
``space_shrink`` section of RESULTS.md. Bad input (a missing or mismatched study, no stored pass,
an unreadable ``--out``) exits 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import optuna

from results_md import write_section
from search_efficiency import WITHIN, hv_curve
from slimtune.spaces import NO_NEUTRAL, per_layer_knobs
from slimtune.studies import SLACK, StorageError, keys, open_storage, pareto_trials, records, stored_sensitivity

HERE = Path(__file__).resolve().parent
MULTIPLES = (1.0, 3.0, 10.0, 30.0)  # thresholds, in floors: 10x is the most the calibrated wave trusts
Rules = dict[tuple[str, str], Callable[[float], bool]]  # (layer, knob) -> whether a value is cut


def pass_drops(data: Any) -> tuple[float, dict[str, list[tuple[str, float, float]]]]:
    """A stored pass (database data) as ``(base score, {layer: [(knob, value, drop)]})``: points
    of per-layer knobs that have a neutral value; a point without a finite score drops ``inf``.
    ``ValueError`` when nothing usable is left.

    >>> pass_drops({"base_score": 0.9, "layers": {"fc": {"points": [{"knob": "weight_bits", "value": 2,
    ...            "score": None}, {"knob": "kd_temperature", "value": 4, "score": 0.9}, {"knob": "x"}]}}})
    (0.9, {'fc': [('weight_bits', 2.0, inf)]})
    """
    knobs = {d.name for d in per_layer_knobs() if d.neutral is not NO_NEUTRAL}
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if not isinstance(data, dict) or not number(data.get("base_score")) or not isinstance(data.get("layers"), dict):
        raise ValueError("the stored sensitivity pass is unreadable")
    base = float(data["base_score"])
    layers: dict[str, list[tuple[str, float, float]]] = {}
    for layer, entry in data["layers"].items():
        points = entry.get("points") if isinstance(entry, dict) else None
        for p in points if isinstance(points, list) else []:
            if isinstance(p, dict) and p.get("knob") in knobs and number(p.get("value")) and math.isfinite(p["value"]):
                score = p.get("score")
                drop = base - score if number(score) and math.isfinite(score) else math.inf
                layers.setdefault(str(layer), []).append((p["knob"], float(p["value"]), drop))
    if not layers:
        raise ValueError("the stored sensitivity pass has no point of a compression knob")
    return base, layers


def cut_rules(layers: dict[str, list[tuple[str, float, float]]], space: Any, threshold: float) -> Rules:
    """``(layer, knob)`` -> whether the shrunk space would leave a value out: a choice knob's
    failing values alone; a range knob's values at least as far from its neutral value as its
    mildest failing one.

    >>> from slimtune.spaces import parse_spec
    >>> space = parse_spec({"study": {"name": "d"}, "model": {"preset": "cnn-digits"},
    ...                     "data": {"preset": "digits"}}).space
    >>> rules = cut_rules({"fc": [("weight_bits", 2, 0.4), ("weight_bits", 4, 0.01), ("prune_ratio", 0.5, 0.0),
    ...                           ("prune_ratio", 0.9, 0.3), ("unit_ratio", 0.5, 0.05)]}, space, 0.02)
    >>> bits, prune, units = rules["fc", "weight_bits"], rules["fc", "prune_ratio"], rules["fc", "unit_ratio"]
    >>> bits(2), bits(4), prune(0.95), prune(0.9), prune(0.7), units(0.4), units(0.6)
    (True, False, True, True, False, True, False)
    """
    neutral = {d.name: d.neutral for d in per_layer_knobs()}
    rules: Rules = {}
    for layer, points in layers.items():
        for knob in {k for k, _, _ in points}:
            failing = [v for k, v, drop in points if k == knob and drop > threshold]
            if not failing or knob not in space.knobs:
                continue
            if space.knobs[knob].choices is not None:  # a choice: that value alone
                rules[layer, knob] = lambda v, cut=frozenset(failing): v in cut
            else:  # a range: from the mildest failing point to the strong end
                mildest = min(abs(v - neutral[knob]) for v in failing)
                rules[layer, knob] = lambda v, n=neutral[knob], m=mildest: abs(v - n) >= m - 1e-9
    return rules


def is_cut(params: dict[str, Any], rules: Rules) -> bool:
    """Whether a plan holds a cut value: its ``layer.knob`` value, or the tied ``knob`` value
    every layer shares (as :func:`slimtune.spaces.estimated_drop` reads a plan).

    >>> rules = {("fc", "weight_bits"): lambda v: v == 2}
    >>> is_cut({"fc.weight_bits": 2}, rules), is_cut({"weight_bits": 2}, rules), is_cut({"fc.weight_bits": 4}, rules)
    (True, True, False)
    """
    for (layer, knob), cut in rules.items():
        value = params.get(f"{layer}.{knob}", params.get(knob))
        if isinstance(value, (int, float)) and cut(value):
            return True
    return False


def front_figures(study: optuna.Study, rules: Rules, drop: float) -> dict[str, Any]:
    """The study's final front with and without the complete trials that hold a cut value: how
    many are cut (of the Pareto plans: :func:`slimtune.studies.pareto_trials`), the hypervolume
    (reference: the floor and the dense bytes, as ``search_efficiency.py``) and the best ratio
    within half a point of the teacher, of all plans and of the plans left."""
    teacher = study.user_attrs[keys.TEACHER]
    reference = (100 * (teacher["val_accuracy"] - drop), math.log10(teacher["dense_bytes"]))
    done = [t for t in records(study) if t.state == optuna.trial.TrialState.COMPLETE
            and t.val_accuracy is not None and t.size_bytes]
    cut = {t.number for t in done if is_cut(t.params, rules)}
    kept = [t for t in done if t.number not in cut]
    pareto = {t.number for t in pareto_trials(study)}
    band = teacher["val_accuracy"] - WITHIN - SLACK  # as best_ratio_within counts

    def hv(trials: list[Any]) -> float:
        curve = hv_curve([(100 * t.val_accuracy, math.log10(t.size_bytes)) for t in trials], reference)
        return curve[-1] if curve else 0.0

    def ratio(trials: list[Any]) -> float:
        return max((t.compression_ratio for t in trials if t.val_accuracy >= band and t.compression_ratio),
                   default=0.0)

    return {"study": study.study_name, "complete": len(done), "cut": len(cut), "pareto": len(pareto),
            "pareto_cut": len(pareto & cut), "hv": hv(done), "hv_without": hv(kept), "ratio": ratio(done),
            "ratio_without": ratio(kept)}


def _load(storage: Any, name: str, url: str) -> optuna.Study:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ValueError(f"--study {name}: no such study in {url}") from None
    if keys.TEACHER not in study.user_attrs or keys.SPEC not in study.user_attrs:
        raise ValueError(f"--study {name}: no teacher or spec stored (not a slimtune study that ran)")
    return study


def _setting(study: optuna.Study) -> tuple[Any, ...]:
    """What a study must share with the pass study: its teacher, floor and space."""
    teacher, spec = study.user_attrs[keys.TEACHER], study.user_attrs[keys.SPEC]
    return (teacher.get("val_accuracy"), teacher.get("dense_bytes"),
            (spec.get("study") or {}).get("max_accuracy_drop"), spec.get("space"))


def measure(url: str, pass_study: str, studies: list[str], multiples: tuple[float, ...] = MULTIPLES) -> dict[str, Any]:
    """Each threshold's cut points and each study's front with and without its cut plans;
    ``ValueError`` names a study that is missing, has no complete trial or differs from the pass
    study, or a pass study without a readable pass."""
    from slimtune.spaces import parse_spec, upgrade_stored_spec

    storage = open_storage(url, read_only=True)
    owner = _load(storage, pass_study, url)
    stored = stored_sensitivity(storage, pass_study)
    if stored is None:
        raise ValueError(f"--pass-study {pass_study}: no stored sensitivity pass in {url} "
                         "(a study searched with [search.seed] plans or uniform above 0 has one)")
    try:
        base, layers = pass_drops(stored)
    except ValueError as exc:
        raise ValueError(f"--pass-study {pass_study}: {exc}") from None
    loaded = [_load(storage, name, url) for name in studies]
    for study in loaded:
        if _setting(study) != _setting(owner):
            raise ValueError(f"--study {study.study_name}: its teacher, max_accuracy_drop or space differ from "
                             f"--pass-study {pass_study}'s; its pass does not describe that search")
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            raise ValueError(f"--study {study.study_name}: no complete trial")
    spec = parse_spec(upgrade_stored_spec(dict(owner.user_attrs[keys.SPEC])))
    drop = spec.max_accuracy_drop
    points = [(layer, knob, value) for layer, entries in layers.items() for knob, value, _ in entries]
    rows = []
    for multiple in multiples:
        rules = cut_rules(layers, spec.space, multiple * drop)
        rows.append({"multiple": multiple, "threshold": multiple * drop,
                     "cut_points": sum((layer, knob) in rules and rules[layer, knob](value)
                                       for layer, knob, value in points),
                     "studies": [front_figures(study, rules, drop) for study in loaded]})
    return {"pass_study": pass_study, "base_score": base, "measured_points": len(points), "floor": drop,
            "date": date.today().isoformat(), "rows": rows}


def render(payload: dict[str, Any]) -> str:
    """The tables of every label in ``payload`` (this script's JSON), each under its command."""
    lines = []
    for label, result in payload["results"].items():
        studies = [s["study"] for s in result["rows"][0]["studies"]]
        lines += [f"Command: `{payload['commands'][label]}` ({result['date']}; reads the studies, trains nothing)",
                  "", f"**{label}** (pass of `{result['pass_study']}`, {result['measured_points']} single-layer "
                  f"points; floor {100 * result['floor']:g} pt; studies {', '.join(f'`{s}`' for s in studies)})", "",
                  "| cut where one layer alone loses more than | points cut | Pareto plans cut | trials cut | "
                  "final HV, all → plans left | best ratio within 0.5 pt, all → plans left |",
                  "|---|---:|---:|---:|---|---|"]
        for row in result["rows"]:
            s = row["studies"]
            mean = lambda key: statistics.mean(x[key] for x in s)  # noqa: E731
            beyond = " (more than any drop)" if row["threshold"] >= result["base_score"] else ""
            lines.append(f"| {row['multiple']:g}× the floor ({100 * row['threshold']:g} pt){beyond} | "
                         f"{row['cut_points']} of {result['measured_points']} | "
                         f"{sum(x['pareto_cut'] for x in s)} of {sum(x['pareto'] for x in s)} | "
                         f"{sum(x['cut'] for x in s)} of {sum(x['complete'] for x in s)} | "
                         f"{mean('hv'):.2f} → {mean('hv_without'):.2f} | "
                         f"{mean('ratio'):.1f}× → {mean('ratio_without'):.1f}× |")
        lines.append("")
    lines.append("Points cut: of the pass's single-layer points. Pareto plans and trials cut: sums over the studies "
                 "(complete trials). Hypervolume and best ratio: means over the studies, of all their plans and of "
                 "the plans no cut value touches. A tied knob's value is cut when one layer fails it.")
    return "\n".join(lines)


def _read_out(path: Path) -> dict[str, Any]:
    """The results file to add to (a new one when absent); ``ValueError`` when unusable."""
    if not path.parent.is_dir():
        raise ValueError(f"--out {path}: its folder does not exist")
    if not path.exists():
        return {"commands": {}, "results": {}}
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        payload = None
    if not (isinstance(payload, dict) and isinstance(payload.get("commands"), dict)
            and isinstance(payload.get("results"), dict)):
        raise ValueError(f"--out {path}: not a space_shrink.py results file (move it, or name another --out)")
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--pass-study", required=True, help="the study whose stored sensitivity pass is read")
    parser.add_argument("--study", action="append", required=True, help="a finished study (repeat)")
    parser.add_argument("--label", default=None, help="the entry's name in the JSON and table (default: storage)")
    parser.add_argument("--multiples", default=",".join(f"{m:g}" for m in MULTIPLES),
                        help="thresholds, in multiples of the study's floor (comma-separated, above 0)")
    parser.add_argument("--out", default=str(HERE / "space_shrink.json"))
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args()
    try:
        multiples = tuple(float(m) for m in args.multiples.split(","))
    except ValueError:
        multiples = ()
    if not multiples or not all(0 < m < math.inf for m in multiples):
        parser.error(f"--multiples {args.multiples!r}: give numbers above 0, comma-separated (e.g. 1,3,10,30)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out, label = Path(args.out), args.label or args.storage
    try:
        payload = _read_out(out)
        payload["results"][label] = measure(args.storage, args.pass_study, args.study, multiples)
    except (ValueError, StorageError) as exc:
        print(f"space_shrink.py: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    payload["commands"][label] = shlex.join([".venv/bin/python", "benchmarks/space_shrink.py", *sys.argv[1:]])
    try:  # before anything is written: an older entry of --out may not render
        text = render(payload)
    except (KeyError, TypeError, ValueError, IndexError):
        print(f"space_shrink.py: --out {out}: an entry in it is not one this script wrote (move it, or name "
              "another --out)", file=sys.stderr)
        raise SystemExit(2) from None
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(text)
    if not args.no_results_md:
        write_section("space_shrink", "## Shrinking the space by the sensitivity pass (`space_shrink.py`)", text)


if __name__ == "__main__":
    main()
