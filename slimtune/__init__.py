"""slimtune: a per-layer search of pruning, quantization and distillation, on a shared study database.

The packages: ``slimtune.spaces`` (the spec and the methods' declarations, no torch),
``slimtune.trainers`` (tensors: models, data, methods, fine-tune, packing), ``slimtune.studies``
(the study database, reports, dashboard; no torch) and ``slimtune.search`` (the runner and the
``slimtune`` command line, also ``python -m slimtune``).

The Python API: ``slimtune.search(model, datamodule, study=..., ...)`` returns a study whose
``pareto()``, ``best(max_drop)`` and ``export(path)`` give the front, the compressed model and
its artifact; ``slimtune.load_study(name, storage)`` reopens one (see ``slimtune.search``).

Example:
    >>> import slimtune
    >>> slimtune.__version__ == __import__("importlib.metadata").metadata.version("slimtune")
    True
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("slimtune")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Study", "__version__", "load_study", "search"]


def __getattr__(name: str) -> Any:
    """``search``, ``load_study`` and ``Study`` on first use (they load torch)."""
    if name in ("search", "load_study", "Study"):
        import importlib

        module = importlib.import_module("slimtune.search")
        return module if name == "search" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
