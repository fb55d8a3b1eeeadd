"""What refreshing slimtune's dashboard plots costs a search, against the trials it runs.

A search refreshes the plots (``publish_figures``: the front and the per-layer plans, written to
the study database) every ``runtime.dashboard_every`` finished trials. This script times one
refresh on a real study (``make demo``'s by default) and on copies of its trials grown to 100
and 400 trials (same records, in a temporary SQLite file), and divides by the study's own median
trial time: the share of a trial that refreshing costs at the default interval.

Usage (after ``make demo``)::

    .venv/bin/python benchmarks/dashboard_refresh.py [--storage sqlite:///slimtune.db]
        [--study lenet300-mnist] [--repeat 5]

Prints a markdown table and writes ``benchmarks/dashboard_refresh.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from slimtune.studies import keys, publish_figures, records

HERE = Path(__file__).resolve().parent


def _declared_every() -> int:
    from slimtune.spaces import spec_reference

    for line in spec_reference().splitlines():
        if line.startswith("dashboard_every"):
            return int(line.split("=", 1)[1].split("#", 1)[0])
    raise SystemExit("runtime.dashboard_every is not declared")


def _grown(study: optuna.Study, size: int, folder: Path) -> optuna.Study:
    """A copy of ``study`` in a new SQLite file, its trials repeated until it holds ``size``."""
    url = f"sqlite:///{folder / f'grown-{size}.db'}"
    copy = optuna.create_study(study_name=study.study_name, storage=url, directions=keys.DIRECTIONS)
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    trials = study.get_trials(deepcopy=False)
    batch = []
    while len(batch) < size:
        for trial in trials:
            if len(batch) < size:
                batch.append(optuna.trial.create_trial(
                    state=trial.state, values=trial.values, params=trial.params, distributions=trial.distributions,
                    user_attrs=trial.user_attrs, system_attrs={}))
    copy.add_trials(batch)
    return copy


def _time(study: optuna.Study, url: str, repeat: int) -> float:
    publish_figures(study, url)  # warm: imports, plotly templates
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        publish_figures(study, url)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default="sqlite:///slimtune.db")
    parser.add_argument("--study", default="lenet300-mnist")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    every = _declared_every()
    source = optuna.load_study(study_name=args.study, storage=args.storage)
    trial_seconds = statistics.median(r.seconds["total"] for r in records(source) if r.seconds.get("total"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        studies = [(len(source.trials), _grown(source, len(source.trials), Path(tmp)))]
        studies += [(n, _grown(source, n, Path(tmp))) for n in (100, 400)]
        for n, study in studies:
            refresh = _time(study, args.storage, args.repeat)
            rows.append({"trials": n, "refresh_s": refresh, "trial_s": trial_seconds, "every": every,
                         "share_of_a_trial": refresh / every / trial_seconds})
    print(f"study {args.study}: median trial {trial_seconds:.2f} s; refresh every {every} finished trials\n")
    print("| trials in the study | one refresh | per trial at the default interval | share of a trial |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['trials']} | {row['refresh_s'] * 1000:.0f} ms | {row['refresh_s'] / every * 1000:.0f} ms | "
              f"{100 * row['share_of_a_trial']:.1f} % |")
    (HERE / "dashboard_refresh.json").write_text(json.dumps({"study": args.study, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
