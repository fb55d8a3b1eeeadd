"""``slimtune dashboard``: optuna-dashboard on a study database, with a note per slimtune study.

Example::

    slimtune dashboard                                   # sqlite:///slimtune.db on 127.0.0.1:8080
    slimtune dashboard --storage sqlite:///runs.db --port 8081
"""

from __future__ import annotations

import argparse
from typing import Any

from slimtune.spaces import DEFAULT_STORAGE

DEFAULT_HOST = "127.0.0.1"  # same as slimtune.studies._dashboard (not imported here: keep the CLI start light)
DEFAULT_PORT = 8080


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: an integer port in 1..65535")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``dashboard`` subcommand to the ``slimtune`` parser."""
    parser = subparsers.add_parser("dashboard", help="serve optuna-dashboard on a study database (Ctrl-C to stop)",
                                   description="Serve optuna-dashboard on the study database, after writing a "
                                   "note on every slimtune study (teacher accuracy, spec, how to read the "
                                   "objectives). Ctrl-C or SIGTERM stops it (exit 0).")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help=f"SQLAlchemy URL (default: {DEFAULT_STORAGE}); "
                        "a missing SQLite file is an error")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST}, this "
                        "machine only; 0.0.0.0 exposes the studies, without login, to the network)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.set_defaults(handler=_cmd_dashboard)
    return parser


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from slimtune.studies import serve_dashboard

    serve_dashboard(args.storage, host=args.host, port=args.port)
    return 0
