"""Packing: bit-for-bit round trip, size equals the bytes, same accuracy after unpacking."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtune.spaces import CompressionPlan, LayerPlan
from slimtune.trainers import apply_plan, bake, build_model, evaluate, pack_model, unpack_model
from slimtune.spaces import ModelSpec


def _plan(layers: dict[str, tuple[float, int]]) -> CompressionPlan:
    return CompressionPlan({n: LayerPlan(r, b, 2.0) for n, (r, b) in layers.items()}, 0.9, 0.0, 1e-3)


@pytest.mark.parametrize(
    "layers",
    [
        {"conv1": (0.0, 8), "conv2": (0.9, 2), "fc1": (0.5, 3), "fc2": (0.0, 32)},  # dense, sparse, raw
        {"conv1": (0.3, 32), "conv2": (0.1, 16), "fc1": (0.95, 5), "fc2": (0.5, 4)},  # sparse32, 16-bit
    ],
)
def test_round_trip_is_bit_for_bit(layers: dict[str, tuple[float, int]]) -> None:
    torch.manual_seed(0)
    model = apply_plan(build_model(ModelSpec(preset="cnn-digits")), _plan(layers))
    blob = pack_model(model, meta={"model": {"preset": "cnn-digits"}})
    state, meta = unpack_model(blob)
    expected = bake(copy.deepcopy(model)).state_dict()
    assert list(state) == list(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype
        assert torch.equal(state[key], tensor), key
    assert meta == {"model": {"preset": "cnn-digits"}}


def test_size_is_the_artifact_length_and_shrinks_with_compression() -> None:
    torch.manual_seed(0)
    base = build_model(ModelSpec(preset="cnn-digits"))
    light = pack_model(apply_plan(copy.deepcopy(base), _plan({"fc1": (0.2, 8)})))
    heavy = pack_model(apply_plan(copy.deepcopy(base), _plan({"conv2": (0.9, 2), "fc1": (0.95, 2)})))
    assert len(heavy) < len(light)
    dense_bytes = 4 * sum(p.numel() for p in base.parameters())
    assert len(heavy) < dense_bytes / 8


def test_unpacked_model_has_the_same_accuracy(digits_teacher) -> None:
    teacher, dm = digits_teacher
    model = apply_plan(copy.deepcopy(teacher), _plan({"conv1": (0.3, 6), "conv2": (0.6, 4), "fc1": (0.8, 3)}))
    restored = build_model(ModelSpec(preset="cnn-digits"))
    restored.load_state_dict(unpack_model(pack_model(model))[0])
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert evaluate(restored, loader) == evaluate(model, loader)
    x = next(iter(dm.test_dataloader()))[0]
    assert torch.equal(restored.eval()(x), model.eval()(x))


def test_rejects_foreign_bytes() -> None:
    with pytest.raises(ValueError, match="not a slimtune artifact"):
        unpack_model(b"PK\x03\x04 not ours")


def test_buffers_and_non_float_state_survive() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    model[1].running_mean.fill_(0.25)
    model[1].num_batches_tracked.fill_(7)
    model = apply_plan(model, _plan({"0": (0.5, 4)}))
    state, _ = unpack_model(pack_model(model))
    assert state["1.num_batches_tracked"].dtype == torch.int64 and int(state["1.num_batches_tracked"]) == 7
    assert torch.equal(state["1.running_mean"], torch.full((4,), 0.25))
