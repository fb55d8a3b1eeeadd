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
    return CompressionPlan({n: LayerPlan(prune_ratio=r, weight_bits=b, kd_temperature=2.0)
                            for n, (r, b) in layers.items()}, kd_alpha=0.9, feature_kd_weight=0.0, lr=1e-3)


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


# Written by version 1 of the packer (bitmap + bit-packed codes in an .xz container) from the
# model that ``_v1_fixture_model`` rebuilds; readers must keep loading such stored artifacts.
_V1_ARTIFACT = bytes.fromhex(
    "534c494d01fd377a585a000004e6d6b446020021011c00000010cf58cce001cd01135d003e803c18745f1bd662cf1cbd"
    "989d1e68e90c7b6f09127bdfa451f4a421ba1c939489bfe007b7695b5da2d4f19be4cd8c48c2ea789f0bd75261460dd2"
    "c6d4819935967cc16d67cf52e3d08cc4fb786fb42f2cc255e13080aaa3f5e76a464c304fbed16baeeb6f7b9b1d5cd438"
    "05c957a3d784ccc58b52c793a454284bae41650213e572b329ac9a3d8ae8eda88103a507afecb68cd33ca8022dfa3bcf"
    "e667165b3605a0fe2baf6c4a36eacf5d6d09590ab9885fa60046287c1b81f946577c79046010417ada77388b7d88da5a"
    "bd05e3bc59b8a04eb857e70f680d1f93b811264bec1637b20e3143aa7f10fd5fe7814b62c847db82842ac0e1e03aa03a"
    "ae02468e5709c6510b634fa894797c3c720ee81b7484000000d435e082c8a350ae0001af02ce030000ea030bc5b1c467"
    "fb020000000004595a"
)


def _v1_fixture_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    return apply_plan(model, CompressionPlan({"0": LayerPlan(prune_ratio=0.75, weight_bits=3, kd_temperature=1.0),
                                              "2": LayerPlan(prune_ratio=0.0, weight_bits=5, kd_temperature=1.0)},
                                             kd_alpha=0.9, feature_kd_weight=0.0, lr=1e-3))


def test_version_1_artifacts_are_still_read() -> None:
    old_state, meta = unpack_model(_V1_ARTIFACT)
    new_state, _ = unpack_model(pack_model(_v1_fixture_model()))
    assert meta == {"model": {"preset": "v1-fixture"}}
    assert old_state.keys() == new_state.keys()
    for key in old_state:
        assert torch.equal(old_state[key], new_state[key]), key
    assert int((old_state["0.weight"] == 0).sum()) == 36


def test_unknown_version_names_the_readable_ones() -> None:
    with pytest.raises(ValueError, match="version 9 is not supported.*1, 2"):
        unpack_model(b"SLIM\x09" + _V1_ARTIFACT[5:])


@pytest.mark.parametrize("zeros_before", [[], [0], [254], [255], [256], [510, 0, 3], [0, 0, 1000, 255]])
def test_run_lengths_round_trip(zeros_before: list[int]) -> None:
    from slimtune.trainers._index import positions, run_lengths

    mask = []
    for zeros in zeros_before:
        mask += [False] * zeros + [True]
    mask += [False] * 7  # trailing zeros are implied by the count
    nonzero = torch.tensor(mask, dtype=torch.bool).numpy()
    encoded = run_lengths(nonzero)
    assert len(encoded) == sum(z // 255 + 1 for z in zeros_before)
    assert (positions(encoded, len(mask)) == nonzero).all()


def test_pruned_weights_cost_less_than_a_raw_bitmap_would() -> None:
    torch.manual_seed(0)
    model = apply_plan(nn.Sequential(nn.Linear(784, 300)), _plan({"0": (0.95, 3)}))
    size = len(pack_model(model))
    nonzero = round(0.05 * 784 * 300)
    bitmap_and_bitpacked = (784 * 300 + 3 * nonzero) / 8 + 300 * 2 + 300 * 4  # index + codes + scales + bias
    assert size < 0.8 * bitmap_and_bitpacked
