"""The search: objective, study runner (launch / resume) and the ``slimtune`` CLI.

Example::

    from slimtune.search import resolve_spec, run_study
    summary = run_study(resolve_spec(preset="cnn-digits", trials=5, storage="sqlite:///demo.db"))
"""

from __future__ import annotations

from ._cli import main
from ._objective import CompressionObjective, TrialFailed
from ._runner import SearchSummary, load_stored_spec, make_sampler, resolve_spec, run_study
from ._signals import GracefulStop, Interrupted

__all__ = ["CompressionObjective", "GracefulStop", "Interrupted", "SearchSummary", "TrialFailed", "load_stored_spec",
           "main", "make_sampler", "resolve_spec", "run_study"]
