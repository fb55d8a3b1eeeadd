"""The ``slimtune`` command line.

Exit codes: 0 done, 1 a search that could not finish (too many failed trials) or an unexpected
error, 2 bad input or a database fault (a message says what and what to do; bad input writes
nothing), 130 interrupted (the running trial is marked FAIL with reason ``interrupted``;
``slimtune resume`` goes on). No error prints a Python traceback unless ``SLIMTUNE_TRACEBACK=1``.

Example::

    slimtune search --preset lenet300-mnist --trials 40
    slimtune resume --study lenet300-mnist
    slimtune pareto --study lenet300-mnist --format json
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from types import ModuleType
from typing import Sequence

import slimtune
from slimtune.spaces import DEFAULT_STORAGE, SpecError, trust
from slimtune.studies import STORAGE_ERRORS, FORMATS, load_existing_study, open_storage, preset_names, render, storage_fault

from ._signals import SearchFailed

from ._env import EXIT_BAD_INPUT, EXIT_INTERRUPTED, STORAGE_ENV, TRACEBACK_ENV
from ._options import add_storage_option, add_trust_option, drop_number, positive_int, positive_seconds, seed_number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtune", description="Per-layer compression search: pruning, "
                                     "quantization and distillation, with a shared Optuna study database.")
    parser.add_argument("--version", action="version", version=f"slimtune {slimtune.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--trials", type=positive_int, help="finished (complete or pruned) trials the study should hold")
        p.add_argument("--timeout", type=positive_seconds, help="stop starting new trials after this many seconds")
        p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: all cores)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--goal-drop", type=drop_number, help="end once the smallest plan within this drop of the "
                       "teacher's val metric has not shrunk for [search] goal_patience trials (study.goal_drop)")
        add_trust_option(p)

    search = sub.add_parser("search", help="launch a search (or continue the same study)")
    search.add_argument("spec", nargs="?", help="a study spec in TOML")
    search.add_argument("--preset", help=f"a shipped study: {', '.join(preset_names())}")
    search.add_argument("--study", help="study name (default: the spec's)")
    search.add_argument("--storage", default=os.environ.get(STORAGE_ENV),
                        help=f"SQLAlchemy URL (default: ${STORAGE_ENV}, else the spec's)")
    search.add_argument("--seed", type=seed_number, help="override the spec's seed")
    search.add_argument("--force", action="store_true", help="continue a study even if its stored spec differs")
    search.add_argument("--workers", type=positive_int, default=1,
                        help="local worker processes sharing the study (each gets its share of the threads)")
    run_options(search)

    resume = sub.add_parser("resume", help="continue a study from its stored spec")
    resume.add_argument("--study", required=True)
    add_storage_option(resume)
    run_options(resume)

    worker = sub.add_parser("worker", help="join an existing study as one more worker (any machine that reaches "
                            "the database)")
    worker.add_argument("--study", required=True)
    add_storage_option(worker)
    run_options(worker)

    studies = sub.add_parser("studies", help="list the studies in a storage")
    add_storage_option(studies)
    studies.add_argument("--format", choices=FORMATS, default="table")

    pareto = sub.add_parser("pareto", help="the Pareto-optimal trials of a study, sorted by size")
    pareto.add_argument("--study", required=True)
    add_storage_option(pareto)
    pareto.add_argument("--format", choices=FORMATS, default="table")

    search.set_defaults(handler=_cmd_search)
    resume.set_defaults(handler=_cmd_search)
    worker.set_defaults(handler=_cmd_search)
    studies.set_defaults(handler=_cmd_studies)
    pareto.set_defaults(handler=_cmd_pareto)
    for module in _command_modules():
        module.add_parser(sub)
    return parser


def _command_modules() -> list[ModuleType]:
    """The modules ``slimtune.search._cmd_*``: each adds one subcommand with ``add_parser(subparsers)``
    (setting ``handler``) and imports its heavy dependencies only inside the handler."""
    package = importlib.import_module("slimtune.search")
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name.startswith("_cmd_"))
    return [importlib.import_module(f"slimtune.search.{name}") for name in names]


def _cmd_search(args: argparse.Namespace) -> int:
    from ._runner import load_stored_spec, resolve_spec, run_study, run_workers

    options = {"timeout": args.timeout, "threads": args.threads, "progress": not args.quiet}
    if args.command in ("resume", "worker"):
        spec = load_stored_spec(args.study, args.storage).with_overrides(trials=args.trials, goal_drop=args.goal_drop)
        summary = run_study(spec, joining=True, **options)
    else:
        spec = resolve_spec(args.spec, args.preset, name=args.study, storage=args.storage, trials=args.trials,
                            seed=args.seed, goal_drop=args.goal_drop)
        args.storage, args.study = spec.storage, spec.name  # for the messages of main()
        if args.workers > 1:
            summary = run_workers(spec, args.workers, force=args.force, **options)
        else:
            summary = run_study(spec, force=args.force, **options)
    print(f"study {summary.study_name} in {summary.storage}: {summary.finished}/{summary.target} finished trials "
          f"({summary.ran} run now, {summary.seconds:.0f} s)", file=sys.stderr)
    storage_hint = f"${STORAGE_ENV}" if "***" in summary.storage else summary.storage
    if summary.goal and not summary.stopped_by:  # run_study said why (workers: say it here)
        if args.command == "search" and args.workers > 1:
            print(summary.goal, file=sys.stderr)
        from slimtune.studies import PARETO_COLUMNS, pareto_frame

        print(render(pareto_frame(load_existing_study(spec.name, spec.storage)), "table", PARETO_COLUMNS), end="")
        return 0
    if summary.stopped_by:
        print(f"search stopped ({summary.stopped_by}); a trial that was running is marked FAIL with reason "
              f"'interrupted'. Continue with:\n  slimtune resume --study {summary.study_name} --storage {storage_hint}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary.failed_workers or (summary.finished < summary.target and args.timeout is None):
        print(f"slimtune: error: the study holds {summary.finished} of {summary.target} finished trials; "
              "see the messages above", file=sys.stderr)
        return 1
    if summary.finished >= summary.target:
        from slimtune.studies import PARETO_COLUMNS, pareto_frame

        print(render(pareto_frame(load_existing_study(spec.name, spec.storage)), "table", PARETO_COLUMNS), end="")
    return 0


def _cmd_studies(args: argparse.Namespace) -> int:
    from slimtune.studies import studies_frame

    print(render(studies_frame(open_storage(args.storage, read_only=True)), args.format), end="")
    return 0


def _cmd_pareto(args: argparse.Namespace) -> int:
    from slimtune.studies import PARETO_COLUMNS, pareto_frame

    print(render(pareto_frame(load_existing_study(args.study, args.storage)), args.format, PARETO_COLUMNS), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slimtune`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "trust", None):
        trust(args.trust)
    try:
        return args.handler(args)
    except SpecError as exc:
        print(f"slimtune: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SearchFailed as exc:
        print(f"slimtune: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slimtune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except STORAGE_ERRORS as exc:
        _traceback_if_asked()
        url = getattr(args, "storage", None) or DEFAULT_STORAGE
        print(f"slimtune: error: {storage_fault(exc, url, getattr(args, 'study', None))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # a file that cannot be read or written: a full disk, a permission
        _traceback_if_asked()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"slimtune: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # a bug: one line, not a traceback (SLIMTUNE_TRACEBACK=1 shows it)
        _traceback_if_asked()
        print(f"slimtune: error: unexpected {type(exc).__name__}: {str(exc).strip()[:500]} (this is a slimtune bug; "
              f"please report it, with the traceback that {TRACEBACK_ENV}=1 prints)", file=sys.stderr)
        return 1


def _traceback_if_asked() -> None:
    if os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes"):
        import traceback

        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
