"""A ``.slim`` file is data: whatever its bytes say, reading it is a clear error or a model, never
a crash, a traceback or an allocation the file did not pay for."""

from __future__ import annotations

import json
import lzma
import struct
from pathlib import Path
from typing import Any

import pytest

import slimtune.trainers._pack as pack_module
from slimtune.search import main
from slimtune.trainers import DigitsCNN, TableMLP, pack_model, unpack_model

MAGIC = b"SLIM"
FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 0, "pb": 0}]
META = {"model": {"preset": "cnn-digits"}, "data": {"preset": "digits"}}


def _raw(manifest: dict[str, Any], blocks: bytes = b"", version: int = 2) -> bytes:
    """An artifact with this manifest and payload, compressed as slimtune writes them."""
    text = json.dumps(manifest).encode()
    payload = struct.pack("<I", len(text)) + text + blocks
    return MAGIC + bytes([version]) + lzma.compress(payload, format=lzma.FORMAT_RAW, filters=FILTERS)


def _entry(**fields: Any) -> dict[str, Any]:
    return {"kind": "raw", "name": "w", "shape": [2], "dtype": "<f4", "blocks": [8], **fields}


def _evaluate(tmp_path: Path, data: bytes, capsys: pytest.CaptureFixture[str]) -> str:
    path = tmp_path / "crafted.slim"
    path.write_bytes(data)
    capsys.readouterr()
    assert main(["evaluate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimtune: error: ") and "Traceback" not in err
    return err


CRAFTED = {
    "not an artifact": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "missing SLIM header"),
    "an unknown version": (MAGIC + b"\x09" + b"\x00" * 8, "version 9 is not supported"),
    "cut short": (pack_model(DigitsCNN(), META)[:200], "not a readable slimtune artifact"),
    "no tensor list": (_raw({"meta": META}), "holds no tensor list"),
    "an object dtype": (_raw({"meta": META, "tensors": [_entry(dtype="|O")]}, b"\x00" * 8), "dtype '|O'"),
    "an unknown kind": (_raw({"meta": META, "tensors": [_entry(kind="pickle")]}, b"\x00" * 8), "kinds"),
    "blocks past the end": (_raw({"meta": META, "tensors": [_entry(blocks=[800])]}, b"\x00" * 8), "past the end"),
    "a shape the bytes do not fill": (_raw({"meta": META, "tensors": [_entry(shape=[5, 5])]}, b"\x00" * 8),
                                      "not a readable slimtune artifact"),
    "bytes no tensor reads": (_raw({"meta": META, "tensors": [_entry()]}, b"\x00" * 12), "no tensor reads"),
    "a repeated name": (_raw({"meta": META, "tensors": [_entry(), _entry()]}, b"\x00" * 16), "repeated name"),
    "an absurd shape": (_raw({"meta": META, "tensors": [_entry(shape=[2**39, 2**39])]}, b""),
                        "claims 302,231,454,903,657,293,676,544 values"),
    "a negative size": (_raw({"meta": META, "tensors": [_entry(shape=[-1])]}, b""), "unreadable shape"),
    "too many bits": (_raw({"meta": META, "tensors": [_entry(kind="quant", bits=40, layout="bytes", blocks=[2, 2])]},
                           b"\x00" * 4), "40 bits"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_artifact_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    data, message = CRAFTED[case]
    assert message in _evaluate(tmp_path, data, capsys)


@pytest.mark.parametrize(("meta", "message"), [
    ({"model": {"preset": "cnn-digits", "source": None}, "data": {"preset": "digits"}}, "unknown keys ['source']"),
    ({"model": {"preset": "resnet-1000"}, "data": {"preset": "digits"}}, "unknown preset 'resnet-1000'"),
    ({"model": {"preset": "cnn-digits"}, "data": {"preset": "digits"}, "factorized": {"nowhere": 2}},
     "meta.factorized.nowhere"),
    ({"model": {"preset": "cnn-digits"}, "data": {"preset": "digits"}, "quantized_inputs": {"fc1": 4}},
     "meta.quantized_inputs.fc1"),
    ({"model": {"preset": "cnn-digits"}, "data": {"preset": "digits"}, "quantized_inputs": {"pool": 8}},
     "meta.quantized_inputs.pool"),
    ({"model": {"preset": "cnn-digits"}, "data": {"preset": "digits"}, "quantized_inputs": ["fc1"]},
     "meta.quantized_inputs"),
    ({"model": {"preset": "cnn-digits"}, "data": {"table": "/etc/passwd"}}, "data.table"),
    ({"model": {"preset": "cnn-digits"}}, "has no data reference"),
])
def test_crafted_meta_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], meta: dict[str, Any],
                                       message: str) -> None:
    assert message in _evaluate(tmp_path, pack_model(DigitsCNN(), meta), capsys)


def test_meta_cannot_make_the_reader_allocate_what_the_file_does_not_hold(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A preset sized by meta (10^12 weights here) is built without memory first and compared
    with the tensors the file holds."""
    small = TableMLP(input_dim=3, num_classes=2, hidden=[4])
    meta = {"model": {"preset": "mlp", "kwargs": {"hidden": [1_000_000, 1_000_000]}},
            "data": {"preset": "breast-cancer"}, "data_info": {"input_dim": 1_000_000, "num_classes": 2}}
    assert "does not fit its tensors" in _evaluate(tmp_path, pack_model(small, meta), capsys)


def test_a_decompression_bomb_is_refused_before_it_is_unpacked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Zeros compress about 7000:1; the reader stops at its payload limit instead of unpacking all."""
    monkeypatch.setattr(pack_module, "MAX_PAYLOAD_BYTES", 1 << 20)
    bomb = _raw({"meta": META, "tensors": [_entry(shape=[1 << 20], blocks=[4 << 20])]}, bytes(4 << 20))
    assert len(bomb) < 2_000
    with pytest.raises(ValueError, match="unpacks to more than 1,048,576 bytes"):
        unpack_model(bomb)


def test_a_real_artifact_still_reads(tmp_path: Path) -> None:
    """The checks refuse crafted files, not slimtune's own."""
    model = DigitsCNN()
    state, meta = unpack_model(pack_model(model, META))
    assert meta == META and set(state) == set(model.state_dict())
