"""``slimtune report``: one self-contained HTML file (opens offline) about a study.

Example::

    slimtune report --study lenet300-mnist                 # -> lenet300-mnist-report.html
    slimtune report --study lenet300-mnist --storage postgresql+psycopg://u:pw@host/db --out front.html
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slimtune.spaces import SpecError

from ._options import add_storage_option


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser("report", help="write a self-contained HTML report of a study (opens offline)")
    parser.add_argument("--study", required=True, help="the study to report on")
    add_storage_option(parser)
    parser.add_argument("--out", help="the HTML file to write (default: <study>-report.html)")
    parser.set_defaults(handler=_cmd_report)
    return parser


def _cmd_report(args: argparse.Namespace) -> int:
    from slimtune.studies import load_existing_study, write_report

    out = Path(args.out if args.out else f"{args.study}-report.html")
    if out.is_dir():
        raise SpecError("--out", str(out), "a file path (not a folder)", "is a folder")
    if not out.parent.is_dir():
        raise SpecError("--out", str(out), "a file in an existing folder", "is in a folder that does not exist")
    study = load_existing_study(args.study, args.storage)  # before any write: an unknown study writes nothing
    size = write_report(study, args.storage, out)
    print(f"{out} ({size:,} bytes)")
    return 0
