"""``slimtune dashboard``: optuna-dashboard on a study database, with a note per slimtune study.

Example::

    slimtune dashboard                                   # sqlite:///slimtune.db on 127.0.0.1:8080
    slimtune dashboard --storage sqlite:///runs.db --port 8081
"""

from __future__ import annotations

import argparse
from typing import Any

from slimtune.studies import DEFAULT_DASHBOARD_HOST as DEFAULT_HOST
from slimtune.studies import DEFAULT_DASHBOARD_PORT as DEFAULT_PORT

from ._options import add_storage_option, number_in


_port = number_in(int, 1, 65535, "an integer port in 1..65535")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``dashboard`` subcommand to the ``slimtune`` parser."""
    parser = subparsers.add_parser("dashboard", help="serve optuna-dashboard on a study database (Ctrl-C to stop)",
                                   description="Serve optuna-dashboard on the study database, read-only unless "
                                   "--allow-write. Ctrl-C or SIGTERM stops it (exit 0).")
    add_storage_option(parser)
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST}, this "
                        "machine only; 0.0.0.0 exposes the studies, without login, to the network)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--allow-write", action="store_true", help="let the page create, edit and delete studies "
                        "(default: read-only, the database opened read-only)")
    parser.set_defaults(handler=_cmd_dashboard)
    return parser


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from slimtune.studies import serve_dashboard

    serve_dashboard(args.storage, host=args.host, port=args.port, allow_write=args.allow_write)
    return 0
