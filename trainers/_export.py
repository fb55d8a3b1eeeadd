"""Reading packed artifacts back into models and evaluating them (ONNX: ``_onnx``).

An artifact (the bytes :func:`pack_model` wrote, stored per trial and written by
``slimtune export``) carries its model and data references in its ``meta``, so it is enough
to rebuild the dequantized model and measure it; nothing is unpickled.

Example:
    >>> from slimtune.trainers import DigitsCNN, pack_model
    >>> blob = pack_model(DigitsCNN(), meta={"model": {"preset": "cnn-digits"}, "data": {"preset": "digits"}})
    >>> model, meta = load_artifact(blob)
    >>> type(model).__name__, meta["data"]
    ('DigitsCNN', {'preset': 'digits'})
"""

from __future__ import annotations

import lzma
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.spaces import DataSpec, SpecError, metric_of, parse_data_section

from ._data import build_datamodule
from ._models import model_from_meta
from ._pack import unpack_model
from .methods import check_input_ranges
from ._teacher import evaluate

SPLITS = ("val", "test")
_ARTIFACT = "a file written by slimtune export (a packed slimtune artifact)"


def _read(source: str | os.PathLike[str] | bytes, name: str | None = None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), name or "<bytes>"
    path = Path(source)
    if not path.is_file():
        raise SpecError("artifact", str(path), _ARTIFACT, "is not a file" if path.exists() else "does not exist")
    return path.read_bytes(), str(path)


def _data_reference(meta: dict[str, Any], name: str) -> DataSpec:
    """The data reference of an artifact's meta, read as data: the ``[data]`` section of a spec,
    validated as one (a module it names is imported only if trusted)."""
    if not isinstance(meta.get("data"), dict):
        raise SpecError("artifact", name, "an artifact whose meta holds the data reference (written by this "
                        "slimtune version)", "has no data reference")
    return parse_data_section(meta["data"], source=_source(name))


def _source(name: str) -> str:
    """Where an artifact's references were read, for messages: a file, or bytes the caller described."""
    return name if name.startswith("the ") else f"artifact {name}"


def _load(data: bytes, name: str, template: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    try:
        state, meta = unpack_model(data)
    except (ValueError, lzma.LZMAError, struct.error, KeyError, IndexError, TypeError, EOFError,
            MemoryError, OverflowError) as exc:
        raise SpecError("artifact", name, _ARTIFACT, f"is not a readable slimtune artifact ({exc})") from None
    if not isinstance(meta, dict):
        raise SpecError("artifact", name, _ARTIFACT, "has no meta table")
    model = model_from_meta(meta, source=_source(name), state=state, template=template)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise SpecError("artifact", name, _ARTIFACT, "does not fit the model it names "
                        f"({str(exc).splitlines()[0][:200]})") from None
    try:
        check_input_ranges(model)
    except ValueError as exc:
        raise SpecError("artifact", name, "input ranges that are finite and hold 0, as a trial stores them",
                        f"is not readable: {exc}") from None
    return model.eval(), meta


def load_artifact(source: str | os.PathLike[str] | bytes, name: str | None = None,
                  template: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The dequantized model (in eval mode) and the ``meta`` of an artifact file or its bytes
    (``name`` says what the bytes are, in messages).

    The architecture is rebuilt from ``meta["model"]`` (never its checkpoint: the artifact
    holds every weight), or from a copy of ``template`` (the uncompressed model, when the caller
    holds it); a model factory it names is imported only if trusted (see
    :func:`slimtune.spaces.require_trusted`). Anything that is not a readable artifact is a
    :class:`SpecError`.
    """
    return _load(*_read(source, name), template=template)


def artifact_datamodule(meta: dict[str, Any], name: str = "artifact") -> Any:
    """The data module named by an artifact's ``meta["data"]``, set up (a table's target read as
    numbers when ``meta["objective"]`` is a regression metric)."""
    return build_datamodule(_data_reference(meta, name), regression=metric_of(meta).regression)


def evaluate_artifact(source: str | os.PathLike[str] | bytes, split: str = "test") -> float:
    """The study's metric (``meta["objective"]``; top-1 accuracy by default) of an artifact's
    model on ``split`` (``val`` or ``test``) of its data, in the metric's units."""
    if split not in SPLITS:
        raise SpecError("--split", split, ", ".join(SPLITS))
    data, name = _read(source)
    model, meta = _load(data, name)
    dm = artifact_datamodule(meta, name)
    return evaluate(model, dm.val_dataloader() if split == "val" else dm.test_dataloader(), metric_of(meta))


def example_batch(dm: Any) -> torch.Tensor:
    """The inputs of the first validation batch (the last-but-one item of a batch, as in ``evaluate``)."""
    batch = next(iter(dm.val_dataloader()))
    return batch[-2]


def first_inputs(batches: Any, count: int) -> torch.Tensor:
    """The first ``count`` inputs of ``batches`` (fewer if it holds fewer), in their own dtype
    (token ids stay integers), read batch by batch until there are enough."""
    taken, seen = [], 0
    for batch in batches:
        taken.append(batch[-2])
        seen += len(batch[-2])
        if seen >= count:
            break
    return torch.cat(taken)[:count]
