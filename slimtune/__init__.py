"""slimtune: a per-layer search of pruning, quantization and distillation, on a shared study database.

The packages: ``slimtune.spaces`` (the spec and the methods' declarations, no torch),
``slimtune.trainers`` (tensors: models, data, methods, fine-tune, packing), ``slimtune.studies``
(the study database, reports, dashboard; no torch) and ``slimtune.search`` (the runner and the
``slimtune`` command line, also ``python -m slimtune``).

Example:
    >>> import slimtune
    >>> slimtune.__version__ == __import__("importlib.metadata").metadata.version("slimtune")
    True
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slimtune")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
