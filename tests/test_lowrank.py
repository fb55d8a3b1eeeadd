"""Low-rank factorization (rank_ratio), L1 sparsity pressure (l1_weight), and both in a search."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from slimtune.search import main
from slimtune.spaces import CompressionPlan, LayerPlan, ModelSpec, SpecError, parse_spec, sample_plan
from slimtune.studies import get_blob, keys, load_preset, open_storage, trials_frame
from slimtune.trainers import (
    DistillationModule, Factorized, apply_plan, bake, build_model, factorize, layer_stats, model_from_meta,
    pack_model, rank_for, unpack_model,
)
from slimtune.trainers._lightning import FeatureTap

from .conftest import digits_spec_dict, without_seeds


def _plan(layers: dict[str, tuple[float, int, float]], l1_weight: float = 0.0) -> CompressionPlan:
    return CompressionPlan({n: LayerPlan(prune_ratio=p, weight_bits=b, kd_temperature=2.0, rank_ratio=r)
                            for n, (p, b, r) in layers.items()},
                           kd_alpha=0.9, feature_kd_weight=0.0, lr=1e-3, l1_weight=l1_weight)


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(20, 12), nn.Linear(7, 30, bias=False), nn.Conv2d(3, 8, 3, padding=1),
     nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2))],
    ids=["linear", "linear-wide-nobias", "conv", "conv-strided"],
)
def test_full_rank_factorization_reproduces_the_layer(layer: nn.Module) -> None:
    torch.manual_seed(0)
    for p in layer.parameters():
        nn.init.normal_(p)
    x = torch.randn(5, 20) if isinstance(layer, nn.Linear) and layer.in_features == 20 else (
        torch.randn(5, 7) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 9, 10))
    low = factorize(layer, rank_for(layer, 1.0))
    weight = layer.weight.flatten(1)
    assert low.rank == min(weight.shape)
    assert (low[1].bias is None) == (layer.bias is None)
    with torch.no_grad():
        assert torch.allclose(low(x), layer(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_truncation_is_the_best_rank_r_approximation(kind: str) -> None:
    torch.manual_seed(1)
    layer = nn.Linear(16, 10) if kind == "linear" else nn.Conv2d(3, 10, 3)
    weight = layer.weight.detach().flatten(1).double()
    singular = torch.linalg.svdvals(weight)
    for ratio, rank in ((0.5, 5), (0.2, 2), (0.01, 1)):
        assert rank_for(layer, ratio) == rank
        low = factorize(layer, rank)
        # the product of the factors, as a matrix out x (in*kh*kw)
        product = (low[1].weight.flatten(1).double() @ low[0].weight.flatten(1).double())
        error = torch.linalg.matrix_norm(weight - product) ** 2
        assert error.item() == pytest.approx(singular[rank:].pow(2).sum().item(), rel=1e-4)  # Eckart-Young


def test_rank_ratio_plan_factorizes_under_the_layer_name_and_records_the_rank() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(preset="cnn-digits"))
    plan = _plan({"conv2": (0.5, 4, 0.25), "fc1": (0.3, 32, 0.1), "fc2": (0.0, 8, 1.0)})
    apply_plan(model, plan)
    assert isinstance(model.conv2, Factorized) and isinstance(model.fc1, Factorized)
    assert not isinstance(model.fc2, Factorized)
    assert model.conv2.rank == round(0.25 * min(32, 16 * 9)) == 8
    assert model.fc1.rank == round(0.1 * min(64, 512)) == 6
    # both factors carry the layer's pruning (exactly) and bits
    for factor in model.fc1:
        assert int((factor.weight == 0).sum()) == round(0.3 * factor.weight.numel())
    stats = layer_stats(model, list(plan.layers))
    assert stats["conv2"]["rank"] == 8 and stats["fc1"]["rank"] == 6 and stats["fc2"]["rank"] == 10
    assert stats["fc1"]["weights"] == 6 * 512 + 64 * 6 and stats["conv2"]["bits"] == 4
    # a forward hook on the layer's name sees the layer's output (feature distillation)
    tap = FeatureTap(model, ["conv2", "fc1"])
    model(torch.randn(3, 1, 8, 8))
    assert tap.outputs["conv2"].shape == (3, 32, 8, 8) and tap.outputs["fc1"].shape == (3, 64)
    tap.remove()


def test_lower_rank_packs_smaller_in_proportion_to_the_kept_weights() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))
    sizes, weights = {}, {}
    for ratio in (1.0, 0.5, 0.25, 0.1):
        model = apply_plan(copy.deepcopy(base), _plan({"0": (0.0, 32, ratio)}))
        blob = pack_model(model)
        sizes[ratio] = len(blob)
        weights[ratio] = sum(t.numel() for t in unpack_model(blob)[0].values())
    r = {ratio: round(ratio * 96) for ratio in (0.5, 0.25, 0.1)}
    for ratio, rank in r.items():
        assert weights[ratio] == rank * (128 + 96) + 96 + 96 * 10 + 10
    assert sizes[1.0] > sizes[0.5] > sizes[0.25] > sizes[0.1]
    for ratio in sizes:  # fp32 weights barely compress: the size follows the weights kept (~3.7 bytes each)
        assert 3.4 < sizes[ratio] / weights[ratio] < 4.1, (ratio, sizes[ratio], weights[ratio])


@pytest.mark.parametrize(
    "layers",
    [
        {"conv1": (0.0, 8, 0.5), "conv2": (0.7, 3, 0.3), "fc1": (0.5, 32, 0.2), "fc2": (0.2, 4, 1.0)},
        {"conv1": (0.4, 32, 1.0), "conv2": (0.0, 32, 0.1), "fc1": (0.9, 2, 0.05), "fc2": (0.0, 16, 0.6)},
    ],
)
def test_factorized_pruned_quantized_round_trip_is_bit_for_bit(layers: dict) -> None:
    torch.manual_seed(0)
    model = apply_plan(build_model(ModelSpec(preset="cnn-digits")), _plan(layers))
    blob = pack_model(model, meta={"model": {"preset": "cnn-digits"}})
    state, meta = unpack_model(blob)
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        logits = model.eval()(x)
    # (baking a deep copy removes the parametrization property from the class the copy shares
    # with ``model``, so ``model`` is not run after this line)
    expected = bake(copy.deepcopy(model)).state_dict()
    assert list(state) == list(expected)
    assert any(k.endswith(".1.weight") for k in state)  # factor keys, e.g. conv2.1.weight
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    factorized = {n: rank_for(model.get_submodule(n), r) for n, (_, _, r) in layers.items() if r < 1}
    assert meta == {"model": {"preset": "cnn-digits"}, "factorized": factorized}
    restored = model_from_meta(meta)
    restored.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), logits)


def test_model_from_meta_sizes_the_mlp_and_rejects_bad_meta() -> None:
    meta = {"model": {"preset": "mlp", "kwargs": {"hidden": [6]}}, "data_info": {"input_dim": 4, "num_classes": 3},
            "factorized": {"fc1": 2}}
    model = model_from_meta(meta)
    assert isinstance(model.fc1, Factorized) and model.fc1[0].weight.shape == (2, 4) and model.out.out_features == 3
    assert model_from_meta(meta, data_info={"input_dim": 9, "num_classes": 3}).fc1[0].weight.shape == (2, 9)
    for bad in ({"fc9": 2}, {"fc1": 5}, {"fc1": 0}):
        with pytest.raises(SpecError, match="meta.factorized"):
            model_from_meta({**meta, "factorized": bad})
    with pytest.raises(SpecError, match="no model reference"):
        model_from_meta({"data": {}})


def test_l1_term_is_added_to_the_loss_with_its_documented_value() -> None:
    torch.manual_seed(0)
    teacher = build_model(ModelSpec(preset="mlp", kwargs={"hidden": [12, 6]}),
                          data_info={"input_dim": 5, "num_classes": 3})
    plan = _plan({"fc1": (0.5, 4, 0.5), "fc2": (0.25, 32, 1.0), "out": (0.0, 8, 1.0)})
    student = apply_plan(copy.deepcopy(teacher), plan)
    batch = (torch.randn(8, 5), torch.randint(0, 3, (8,)))

    def loss(weight: float) -> torch.Tensor:
        module = DistillationModule(student, lr=1e-3, kd_alpha=0.7, logit_temperature=2.0, feature_kd_weight=0.0,
                                    feature_temperatures={}, teacher=teacher, l1_weight=weight,
                                    l1_layers=list(plan.layers))
        return module.training_step(batch, 0).detach()

    fc1 = torch.cat([student.fc1[0].weight.flatten(), student.fc1[1].weight.flatten()])  # both factors together
    by_hand = fc1.abs().mean() + student.fc2.weight.abs().mean() + student.out.weight.abs().mean()
    assert by_hand > 0
    assert (loss(0.3) - loss(0.0)).item() == pytest.approx(0.3 * by_hand.item(), rel=1e-5)
    assert loss(0.0).item() == pytest.approx(loss(0.0).item())  # no randomness in a step
    # the penalty pulls the (parametrized) weights: the gradient reaches the unmasked originals
    module = DistillationModule(student, lr=1e-3, kd_alpha=1.0, logit_temperature=2.0, feature_kd_weight=0.0,
                                feature_temperatures={}, teacher=teacher, l1_weight=1.0, l1_layers=["fc2"])
    module.l1_penalty().backward()
    grad = student.fc2.parametrizations.weight.original.grad
    mask = student.fc2.parametrizations.weight[0].mask
    assert grad is not None and (grad[mask == 0] == 0).all() and (grad[mask == 1] != 0).all()


# ---- the knobs in the spec --------------------------------------------------------------------

def test_new_knobs_default_off_and_leave_existing_specs_unchanged() -> None:
    spec = parse_spec(digits_spec_dict())
    assert spec.space.knobs["rank_ratio"].fixed == 1.0 and spec.space.knobs["l1_weight"].fixed == 0.0
    # the knobs at their neutral value are left out of the fingerprint (so a stored study stays resumable
    # without --force); the values are 0.2's, whose sections and defaults changed every fingerprint once
    assert spec.fingerprint() == "f8ba404ff4c58995"
    assert parse_spec(load_preset("cnn-digits")).fingerprint() == "0dd9fad10950b3cf"
    assert parse_spec(load_preset("lenet300-mnist")).fingerprint() == "4e4600e1504af4f6"
    explicit = digits_spec_dict()
    explicit["space"].update(rank_ratio={"fixed": 1.0}, l1_weight={"fixed": 0.0})  # written out at their neutral value
    assert parse_spec(explicit).fingerprint() == spec.fingerprint()
    searched = digits_spec_dict()
    searched["space"]["rank_ratio"] = {"low": 0.1, "high": 1.0}
    assert parse_spec(searched).fingerprint() != spec.fingerprint()
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    plan = sample_plan(trial, spec.space, ["conv1", "fc1"])
    assert not any("rank_ratio" in p or "l1_weight" in p for p in trial.params)
    assert {p.rank_ratio for p in plan.layers.values()} == {1.0} and plan.l1_weight == 0.0
    old = plan.to_dict()
    del old["l1_weight"]
    for layer in old["layers"].values():
        del layer["rank_ratio"]
    assert CompressionPlan.from_dict(old) == plan  # plans stored before the knobs existed


def test_rank_ratio_and_l1_weight_are_searched_tied_and_overridden_like_other_knobs() -> None:
    data = digits_spec_dict()
    data["space"]["rank_ratio"] = {"low": 0.2, "high": 0.9}
    data["space"]["l1_weight"] = {"low": 0.0, "high": 0.5}
    data["space"]["layer"] = {"fc2": {"rank_ratio": 1.0}}
    spec = parse_spec(data)
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    plan = sample_plan(trial, spec.space, ["conv1", "fc1", "fc2"])
    assert {"conv1.rank_ratio", "fc1.rank_ratio", "l1_weight"} <= set(trial.params)
    assert "fc2.rank_ratio" not in trial.params and plan.layers["fc2"].rank_ratio == 1.0
    assert 0.2 <= plan.layers["fc1"].rank_ratio <= 0.9 and plan.l1_weight == trial.params["l1_weight"]
    data["space"]["rank_ratio"] = {"low": 0.2, "high": 0.9, "tie": True}
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    plan = sample_plan(trial, parse_spec(data).space, ["conv1", "fc1"])
    assert "rank_ratio" in trial.params and plan.layers["conv1"].rank_ratio == plan.layers["fc1"].rank_ratio


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [("rank_ratio", {"low": 0.0, "high": 1.0}, "space.rank_ratio.low"),
     ("rank_ratio", {"fixed": 1.5}, "space.rank_ratio.fixed"),
     ("l1_weight", {"low": -0.1, "high": 1.0}, "space.l1_weight.low"),
     ("l1_weight", {"fixed": 0.1, "tie": True}, "space.l1_weight.tie")],
)
def test_bad_knob_values_name_the_key(key: str, value: dict, named: str) -> None:
    data = digits_spec_dict()
    data["space"][key] = value
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert str(info.value).startswith(named) and "allowed:" in str(info.value)


# ---- end to end: a generated table, rank and L1 searched, through the CLI ---------------------

SEARCH_SPEC = """
[study]
name = "table-lowrank"
trials = 3
seed = 0
max_accuracy_drop = 0.5

[search]
sampler = "random"

[model]
preset = "mlp"
kwargs = {{ hidden = [24, 12] }}

[data]
table = "{table}"
target = "kind"
categorical = ["site"]

[teacher]
epochs = 15
batch_size = 32
lr = 5e-3

[finetune]
epochs = 1
batch_size = 32

[space]
prune_ratio = {{ low = 0.0, high = 0.6 }}
weight_bits = {{ choices = [4, 8] }}
rank_ratio = {{ low = 0.1, high = 0.6 }}
l1_weight = {{ low = 0.0, high = 0.1 }}
lr = {{ fixed = 2e-3 }}
"""


def test_search_on_a_table_with_rank_and_l1_searched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    n = 240
    x = rng.normal(size=(n, 6))
    site = np.array(["north", "south", "east"])[rng.integers(0, 3, n)]
    kind = np.where(x[:, 0] + x[:, 1] - x[:, 2] + (site == "north") > 0.3, "b", "a")
    frame = pd.DataFrame(x, columns=[f"m{i}" for i in range(6)]).assign(site=site, kind=kind)
    table = tmp_path / "gen.csv"
    frame.to_csv(table, index=False)
    spec = tmp_path / "spec.toml"
    spec.write_text(without_seeds(SEARCH_SPEC.format(table=table)))  # the random sampler's own plans
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    assert main(["search", str(spec), "--storage", url, "--quiet", "--trials", "3"]) == 0
    study = optuna.load_study(study_name="table-lowrank", storage=url)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len([t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 3 and complete
    storage = open_storage(url)
    from slimtune.trainers import build_datamodule, evaluate

    dm = build_datamodule(parse_spec(study.user_attrs[keys.SPEC]).data)
    for trial in complete:
        assert {"fc1.rank_ratio", "fc2.rank_ratio", "out.rank_ratio", "l1_weight"} <= set(trial.params)
        layers = trial.user_attrs[keys.TRIAL_LAYERS]
        assert layers["fc1"]["rank"] == max(1, round(trial.params["fc1.rank_ratio"] * 9))  # min(24, 6 + 3 sites)
        assert layers["fc2"]["rank"] == max(1, round(trial.params["fc2.rank_ratio"] * 12))
        state, meta = unpack_model(get_blob(storage, "table-lowrank", keys.artifact_blob_key(trial.number)))
        assert meta["factorized"] == {n: s["rank"] for n, s in layers.items()}
        assert meta["data_info"] == {"input_dim": 9, "num_classes": 2}
        model = model_from_meta(meta)
        model.load_state_dict(state)
        assert evaluate(model, dm.val_dataloader()) == trial.values[0]
        assert evaluate(model, dm.test_dataloader()) == trial.user_attrs[keys.TRIAL_TEST_ACCURACY]
    capsys.readouterr()
    assert main(["pareto", "--study", "table-lowrank", "--storage", url, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {"fc1.rank_ratio", "fc1.rank", "out.rank", "l1_weight"} <= set(rows[0])
    by_trial = {t.number: t for t in complete}
    for row in rows:
        assert row["fc1.rank"] == by_trial[row["trial"]].user_attrs[keys.TRIAL_LAYERS]["fc1"]["rank"]
        assert row["fc1.rank_ratio"] == pytest.approx(by_trial[row["trial"]].params["fc1.rank_ratio"], rel=1e-8)
    columns = list(trials_frame(study).columns)
    assert columns.index("fc1.rank_ratio") < columns.index("fc1.rank") < columns.index("fc2.prune_ratio")
