"""A compression method is one module and one registration line: a toy method (weight clipping),
registered from this file, is searched, applied, recorded, reported and exported end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn
from torch.nn.utils import parametrize

from slimtune.search import main
from slimtune.spaces import Declaration, KnobDeclaration, LayerPlan, Panel, Setting, parse_spec
from slimtune.studies import TrialRecord, load_existing_study, pareto_frame, write_report
from slimtune.trainers import CompressionMethod, register_method, unregister_method, weight_tensors

from .conftest import SPEC_TOML


class ClipTo(nn.Module):
    """Clip a weight to ``share`` of its largest magnitude (per output row with ``per_row``)."""

    def __init__(self, share: float, per_row: bool) -> None:
        super().__init__()
        self.share, self.per_row = share, per_row

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.flatten(1) if self.per_row else weight.reshape(1, -1)
        bound = (self.share * flat.detach().abs().amax(dim=1, keepdim=True)).reshape(
            (-1,) + (1,) * (weight.dim() - 1) if self.per_row else ())
        return torch.maximum(torch.minimum(weight, bound), -bound)


class Clip(CompressionMethod):
    declaration = Declaration(
        "clip", "clip each weight to a share of the largest magnitude",
        knobs=(KnobDeclaration("clip_ratio", "float", {"fixed": 1.0}, 0.0, 1.0, low_open=True, neutral=1.0,
                               allowed_text="a share in (0, 1] of the largest magnitude (1: no clipping)"),),
        options=(Setting("per_row", bool, False, "clip each output row to its own largest magnitude", neutral=False),),
        stats=("clipped",),
        panels=(Panel("clipped (achieved)", "clipped", "achieved", "Reds", ".0%", "clipped %{z:.1%}", 0.0, 1.0),),
    )

    def apply(self, model: nn.Module, name: str, layer: nn.Module, values: LayerPlan, context: Any) -> None:
        if values["clip_ratio"] < 1:
            for module, tensor in weight_tensors(layer):
                parametrize.register_parametrization(
                    module, tensor, ClipTo(values["clip_ratio"], context.options("clip").per_row))

    def achieved(self, layer: nn.Module) -> dict[str, float]:
        weights = [getattr(m, tensor).detach() for m, tensor in weight_tensors(layer)]
        top = max(float(w.abs().max()) for w in weights)
        at_bound = sum(int((w.abs() >= top - 1e-12).sum()) for w in weights)
        return {"clipped": at_bound / sum(w.numel() for w in weights)}


@pytest.fixture
def clip() -> Any:
    method = register_method(Clip())
    yield method
    unregister_method("clip")


def test_a_registered_method_is_searched_recorded_reported_and_exported(clip: Clip, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "clip.toml"
    spec.write_text(SPEC_TOML.replace('lr = { fixed = 2e-3 }', 'lr = { fixed = 2e-3 }\nclip_ratio = { low = 0.3, '
                                      'high = 0.9 }') + '\n[method.clip]\nper_row = true\n')
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    assert main(["search", str(spec), "--storage", url, "--quiet"]) == 0

    study = optuna.load_study(study_name="digits-test", storage=url)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete
    for trial in complete:
        record = TrialRecord.of(trial)
        assert {f"{layer}.clip_ratio" for layer in ("conv1", "conv2", "fc1", "fc2")} <= set(trial.params)
        assert all(0.3 <= p["clip_ratio"] <= 0.9 for p in record.plan["layers"].values())
        assert all(0 < stats["clipped"] < 1 for stats in record.layers.values())
    assert parse_spec({**json.loads(json.dumps(study.user_attrs["slimtune:spec"])),
                       "study": {"name": "x"}}).method("clip").per_row is True

    frame = pareto_frame(load_existing_study("digits-test", url))
    assert {"fc1.clip_ratio", "fc1.clipped"} <= set(frame.columns)
    report = tmp_path / "report.html"
    write_report(load_existing_study("digits-test", url), url, report)
    assert "clipped (achieved)" in report.read_text()

    # the packed artifact holds the clipped weights (as floats: the method has no codec of its own)
    best = complete[0]
    out = tmp_path / "clip.slim"
    assert main(["export", "--study", "digits-test", "--storage", url, "--trial", str(best.number),
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == TrialRecord.of(best).test_accuracy


def test_registration_is_checked(clip: Clip) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Other", (Clip,), {"declaration": Declaration("clip", "another clip")})())
    taken = Declaration("prune2", "x", knobs=(KnobDeclaration("prune_ratio", "float", {"fixed": 0.0}, 0.0, 1.0),))
    with pytest.raises(ValueError, match="knob 'prune_ratio' of method 'prune2' is declared by another method"):
        register_method(type("Prune2", (CompressionMethod,), {"declaration": taken})())
    with pytest.raises(TypeError, match="has no declaration"):
        register_method(CompressionMethod())
    with pytest.raises(ValueError, match="built in"):
        unregister_method("prune")
