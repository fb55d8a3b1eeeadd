"""Write one benchmark's section of ``benchmarks/RESULTS.md``, between its own markers.

Each script owns the text between ``<!-- KEY:start -->`` and ``<!-- KEY:end -->``; a rerun
replaces it and leaves the rest of the file alone. A file without the markers gets them
appended under ``heading``.

Example::

    path = write_section("trial_cost", "## Cost of a trial", table)
"""

from __future__ import annotations

from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(key: str, heading: str, body: str, path: Path = RESULTS_MD) -> Path:
    """Replace (or append under ``heading``) the ``key`` section of ``path`` with ``body``."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = path.read_text()
    section = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{section}\n"
    path.write_text(text)
    return path
