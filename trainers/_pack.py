"""Packing a compressed model into the bytes we count: ``size_bytes == len(pack_model(...))``.

Format (version 3; version 2 when no entry is ``half``), all integers little-endian::

    b"SLIM" | u8 version | xz( u32 manifest_length | manifest (UTF-8 JSON) | blocks ... )

The manifest holds ``meta`` (the model reference from the spec, so a loader can rebuild the
architecture) and one entry per ``state_dict`` tensor, in order, with its block lengths. Each
method adds to ``meta`` what a loader must rebuild (``methods.CompressionMethod.architecture``;
low rank: ``meta["factorized"] = {layer: rank}``, both factors being ordinary entries
``fc1.0.weight``, ``fc1.1.weight``).

A parametrized tensor is written by the codec of its *last* parametrization (a method's
``codecs()``: fake quantization writes ``quant``, a float16 bias ``half``), from the tensor as it
enters that parametrization (the masks before it applied); a tensor whose last parametrization
has no codec (masks only, or a method that changes float values) is written as floats, its
parametrizations baked in. Entry kinds:

- ``raw``: the tensor's bytes in its own dtype (biases, unquantized layers, buffers, and
  unquantized weights pruned so little that an index would not pay);
- ``sparse32``: floats with at least half of them zero: the index of the nonzero ones
  (``_index.run_lengths``) and their values as float32;
- ``quant`` and ``half``: see ``slimtune.trainers.methods.quantize``.

The whole payload then goes through xz (LZMA2, preset 9e, no position context: ``pb=0 lp=0
lc=0``, the setting that suits byte-per-symbol streams), a standard lossless codec, as raw
LZMA2 with no container.
Unpacking gives back the compressed weights bit for bit (``dequantize(codes, scales)``).
Version 1 artifacts (bitmap and bit-packed codes, ``.xz`` container) are still read.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from slimtune.spaces import CompressionPlan, LayerPlan
    >>> from slimtune.trainers import apply_plan, bake
    >>> model = apply_plan(nn.Sequential(nn.Linear(64, 32)),
    ...                    CompressionPlan({"0": LayerPlan(prune_ratio=0.75, weight_bits=3)}, kd_alpha=0.9,
    ...                                    feature_kd_weight=0.0, lr=1e-3))
    >>> blob = pack_model(model, meta={"model": {"preset": "demo"}})
    >>> state, meta = unpack_model(blob)
    >>> torch.equal(state["0.weight"], bake(model).state_dict()["0.weight"]), meta["model"]
    (True, {'preset': 'demo'})
"""

from __future__ import annotations

import json
import lzma
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ._index import bitmap, positions, run_lengths
from .methods import Codec, methods

MAGIC = b"SLIM"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 0, "lp": 0, "pb": 0}]
_ORIGINAL = ".original"
# The order of an entry's fields in the manifest, per kind, as version 2 and 3 writers wrote them,
# so the same model packs to the same bytes (and size) as before; a new kind follows "quant"'s.
_FIELD_ORDER = {"raw": ("kind", "shape", "dtype", "name", "blocks"), "sparse32": ("kind", "shape", "name", "blocks"),
                "quant": ("kind", "layout", "bits", "shape", "name", "blocks"), "half": ("kind", "name", "shape", "blocks")}
_PLAIN_ORDER = ("kind", "name", "shape", "dtype", "blocks")  # a tensor no method parametrized


def _codecs() -> list[Codec]:
    return [codec for method in methods() for codec in method.codecs()]


def _encode_floats(value: torch.Tensor) -> tuple[dict[str, Any], list[bytes]]:
    values = value.detach().flatten().cpu().numpy().astype("<f4")
    nonzero = values != 0
    if 2 * int(nonzero.sum()) >= values.size:  # barely pruned: raw is smaller
        return {"kind": "raw", "dtype": "<f4"}, [values.tobytes()]
    return {"kind": "sparse32"}, [run_lengths(nonzero), values[nonzero].tobytes()]


def _encode_parametrized(module: nn.Module, tensor_name: str) -> tuple[dict[str, Any], list[bytes]]:
    """A parametrized tensor's entry: by its last parametrization's codec, else as floats."""
    chain = module.parametrizations[tensor_name]
    value = chain.original.detach()
    for parametrization in list(chain)[:-1]:
        value = parametrization(value).detach()
    last = list(chain)[-1]
    codec = next((c for c in _codecs() if isinstance(last, c.writes)), None)
    if codec is None:
        return _encode_floats(last(value))
    fields, parts = codec.encode(last, value)
    return {"kind": codec.kind, **fields}, parts


def pack_model(model: nn.Module, meta: dict[str, Any] | None = None) -> bytes:
    """Serialize a (parametrized) compressed model; the returned length is its honest size.

    ``meta`` is stored as given, plus what each method says a loader must rebuild
    (``architecture()``; low rank: ``"factorized": {layer: rank}``).
    """
    meta = dict(meta or {})
    for method in methods():
        meta.update(method.architecture(model))
    entries: list[dict[str, Any]] = []
    blocks: list[bytes] = []
    modules = dict(model.named_modules())
    for key, tensor in model.state_dict().items():
        module_name, found, rest = key.rpartition(".parametrizations.")
        if found:
            if not rest.endswith(_ORIGINAL):
                continue  # masks and other parametrization state are encoded with their tensor
            tensor_name = rest[: -len(_ORIGINAL)]
            entry, parts = _encode_parametrized(modules[module_name], tensor_name)
            entry["name"] = f"{module_name}.{tensor_name}" if module_name else tensor_name
            order = _FIELD_ORDER.get(entry["kind"], _FIELD_ORDER["quant"])
        else:
            array = tensor.detach().cpu().contiguous().numpy()
            entry, parts = {"kind": "raw", "dtype": array.dtype.str, "name": key}, [array.tobytes()]
            order = _PLAIN_ORDER
        entry["shape"] = list(tensor.shape)
        entry["blocks"] = [len(p) for p in parts]
        entries.append({**{k: entry[k] for k in order if k in entry}, **{k: v for k, v in entry.items()
                                                                        if k not in order}})
        blocks.extend(parts)
    manifest = json.dumps({"meta": meta, "tensors": entries}, separators=(",", ":")).encode()
    payload = struct.pack("<I", len(manifest)) + manifest + b"".join(blocks)
    version = VERSION if any(e["kind"] == "half" for e in entries) else 2  # readable by version-2 readers
    return MAGIC + bytes([version]) + lzma.compress(payload, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


MAX_PAYLOAD_BYTES = 4 * 2**30  # an artifact unpacking to more is refused (a crafted file could claim terabytes)
_RAW_DTYPES = {"<f4", "<f2", "<f8", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1", "<u2", "<u4", "<u8"}
_CORE_BLOCKS = {"raw": 1, "sparse32": 2}


def _decompress(data: bytes, version: int) -> bytes:
    """The payload, refusing one larger than :data:`MAX_PAYLOAD_BYTES` before it is all in memory."""
    decompressor = (lzma.LZMADecompressor() if version == 1
                    else lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))
    payload = decompressor.decompress(data, max_length=MAX_PAYLOAD_BYTES + 1)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"the artifact unpacks to more than {MAX_PAYLOAD_BYTES:,} bytes")
    if not decompressor.eof and version != 1:
        raise ValueError("the compressed stream is cut short")
    return payload


def _checked_entry(entry: Any, seen: set[str], codecs: dict[str, Codec]) -> tuple[str, tuple[int, ...], int]:
    """``(name, shape, element count)`` of a manifest entry, whose fields are checked as data."""
    kinds = sorted({*_CORE_BLOCKS, *codecs})
    if not isinstance(entry, dict) or entry.get("kind") not in kinds:
        raise ValueError(f"a manifest entry is not one of the kinds {kinds}")
    name, shape, blocks = entry.get("name"), entry.get("shape"), entry.get("blocks")
    if not isinstance(name, str) or name in seen:
        raise ValueError(f"a manifest entry has a missing or repeated name ({name!r})")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
        raise ValueError(f"tensor {name} has an unreadable shape {shape!r}")
    if not isinstance(blocks, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0
                                               for b in blocks):
        raise ValueError(f"tensor {name} has unreadable block lengths")
    count = int(np.prod(shape, dtype=object)) if shape else 1
    if count > MAX_PAYLOAD_BYTES:
        raise ValueError(f"tensor {name} claims {count:,} values")
    kind = entry["kind"]
    if kind == "raw" and entry.get("dtype") not in _RAW_DTYPES:
        raise ValueError(f"tensor {name} has dtype {entry.get('dtype')!r}; allowed: {sorted(_RAW_DTYPES)}")
    if kind in codecs:
        codecs[kind].check(entry, tuple(shape))
    expected = _CORE_BLOCKS[kind] if kind in _CORE_BLOCKS else codecs[kind].blocks(entry)
    if len(blocks) != expected:
        raise ValueError(f"tensor {name} has {len(blocks)} blocks; a {kind} entry has {expected}")
    seen.add(name)
    return name, tuple(shape), count


def _entries(data: bytes) -> tuple[dict[str, Any], list[tuple[dict[str, Any], list[bytes], int, tuple[int, ...]]], int]:
    """The ``meta``, each checked entry with its blocks, element count and shape, and the
    version of :func:`pack_model` bytes (see :func:`unpack_model` for what is refused)."""
    if data[:4] != MAGIC or len(data) < 5:
        raise ValueError("not a slimtune artifact (missing SLIM header)")
    if data[4] not in READABLE_VERSIONS:
        raise ValueError(f"slimtune artifact version {data[4]} is not supported (this reader knows "
                         f"{', '.join(map(str, READABLE_VERSIONS))})")
    version = data[4]
    payload = _decompress(data[5:], version)
    (length,) = struct.unpack_from("<I", payload)
    manifest = json.loads(payload[4: 4 + length])
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), list):
        raise ValueError("the manifest holds no tensor list")
    codecs = {c.kind: c for c in _codecs()}
    pos = 4 + length
    seen: set[str] = set()
    out = []
    for entry in manifest["tensors"]:
        name, shape, count = _checked_entry(entry, seen, codecs)
        parts = []
        for size in entry["blocks"]:
            if pos + size > len(payload):
                raise ValueError(f"tensor {name}'s blocks run past the end of the payload")
            parts.append(payload[pos: pos + size])
            pos += size
        out.append((entry, parts, count, shape))
    if pos != len(payload):
        raise ValueError(f"the payload holds {len(payload) - pos} bytes that no tensor reads")
    return manifest.get("meta", {}), out, version


def unpack_model(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read :func:`pack_model` bytes back into a plain ``state_dict`` and the ``meta`` dict.

    The bytes are read as untrusted data: anything that does not describe tensors consistently
    (unknown kinds or dtypes, block lengths that do not fit the shapes, a payload over
    :data:`MAX_PAYLOAD_BYTES`) is a ``ValueError``; nothing in the file is executed.
    """
    meta, entries, version = _entries(data)
    codecs = {c.kind: c for c in _codecs()}
    state: dict[str, torch.Tensor] = {}
    for entry, parts, count, shape in entries:
        name, kind = entry["name"], entry["kind"]
        if kind == "raw":
            array = np.frombuffer(parts[0], dtype=np.dtype(entry["dtype"])).reshape(shape)
            state[name] = torch.from_numpy(array.copy())
        elif kind == "sparse32":
            nonzero = positions(parts[0], count) if version > 1 else bitmap(parts[0], count)
            values = np.zeros(count, dtype=np.float32)
            values[nonzero] = np.frombuffer(parts[1], dtype="<f4")
            state[name] = torch.from_numpy(values.reshape(shape))
        else:
            state[name] = codecs[kind].decode(entry, parts, count, shape, version)
    return state, meta


@dataclass(frozen=True)
class StoredCodes:
    """A weight stored as integers: its ``codes`` (int64), per-output-channel ``scales`` (float32;
    ``codes * scales`` per channel is the weight) and ``bits``."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int


def unpack_codes(data: bytes) -> dict[str, StoredCodes]:
    """The integer codes of every tensor :func:`pack_model` stored as integers (``quant`` entries),
    by ``state_dict`` name, read as :func:`unpack_model` reads them."""
    _, entries, version = _entries(data)
    codecs = {c.kind: c for c in _codecs()}
    out: dict[str, StoredCodes] = {}
    for entry, parts, count, shape in entries:
        codec = codecs.get(entry["kind"])
        if codec is not None and codec.codes is not None:
            codes, scales = codec.codes(entry, parts, count, shape, version)
            out[entry["name"]] = StoredCodes(codes, scales, int(entry["bits"]))
    return out


def layer_stats(model: nn.Module, layer_names: list[str]) -> dict[str, dict[str, float]]:
    """What each method achieved on each layer (sparsity, bits, rank, units kept), plus the
    layer's weight count (``weights``: both factors of a factorized layer)."""
    from .methods import weight_tensors

    out: dict[str, dict[str, float]] = {}
    for name in layer_names:
        layer = model.get_submodule(name)
        stats: dict[str, float] = {"weights": sum(getattr(m, n).numel() for m, n in weight_tensors(layer))}
        for method in methods():
            stats.update(method.achieved(layer))
        out[name] = stats
    return out
