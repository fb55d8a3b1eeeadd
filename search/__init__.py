"""The search: objective, study runner (launch / resume / workers), the Python API and the ``slimtune`` CLI.

The names below are imported on first use, so that ``slimtune studies`` and ``slimtune pareto``
start without loading torch. The module itself is callable: ``slimtune.search(model, datamodule,
study=...)`` is :func:`search_objects` (the Python API, ``search/_api.py``).

Example::

    from slimtune.search import resolve_spec, run_study
    summary = run_study(resolve_spec(preset="cnn-digits", trials=5, storage="sqlite:///demo.db"))
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {
    "main": "._cli",
    "CompressionObjective": "._objective", "TrialFailed": "._objective",
    "SearchSummary": "._runner", "load_stored_spec": "._runner", "make_sampler": "._runner",
    "resolve_spec": "._runner", "run_study": "._runner", "run_workers": "._runner", "worker_device": "._runner",
    "GracefulStop": "._signals", "Interrupted": "._signals", "SearchFailed": "._signals",
    "run_until_target": "._loop", "stored_fingerprint": "._runner",
    "Study": "._api", "load_study": "._api", "search_objects": "._api", "spec_for_objects": "._api",
}
__all__ = [
    "CompressionObjective", "GracefulStop", "Interrupted", "SearchFailed", "SearchSummary", "Study", "TrialFailed",
    "load_stored_spec", "load_study", "main", "make_sampler", "resolve_spec", "run_study", "run_until_target",
    "run_workers", "search_objects", "spec_for_objects", "stored_fingerprint", "worker_device",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    source = "search" if name == "search_objects" else name
    return getattr(importlib.import_module(_EXPORTS[name], __name__), source)


class _CallableModule(types.ModuleType):
    """``slimtune.search`` is both this package and the API's entry point: calling the module
    runs :func:`search_objects` (a module cannot be called otherwise)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return __getattr__("search_objects")(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
