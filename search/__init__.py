"""The search: objective, study runner (launch / resume / workers) and the ``slimtune`` CLI.

The names below are imported on first use, so that ``slimtune studies`` and ``slimtune pareto``
start without loading torch.

Example::

    from slimtune.search import resolve_spec, run_study
    summary = run_study(resolve_spec(preset="cnn-digits", trials=5, storage="sqlite:///demo.db"))
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "main": "._cli",
    "CompressionObjective": "._objective", "TrialFailed": "._objective",
    "SearchSummary": "._runner", "load_stored_spec": "._runner", "make_sampler": "._runner",
    "resolve_spec": "._runner", "run_study": "._runner", "run_workers": "._runner",
    "GracefulStop": "._signals", "Interrupted": "._signals", "SearchFailed": "._signals",
    "run_until_target": "._loop", "stored_fingerprint": "._runner",
}
__all__ = [
    "CompressionObjective", "GracefulStop", "Interrupted", "SearchFailed", "SearchSummary", "TrialFailed",
    "load_stored_spec", "main", "make_sampler", "resolve_spec", "run_study", "run_until_target", "run_workers",
    "stored_fingerprint",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
