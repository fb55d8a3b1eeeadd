"""Every sampler the spec offers runs a study past its random start-up trials."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

import slimtune
from slimtune.search import make_sampler
from slimtune.spaces import SAMPLERS, parse_spec
from slimtune.trainers import DigitsDataModule

from .test_python_api import SETTINGS, SPACE, _trained, SmallNet

KIND = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
        "gp": optuna.samplers.GPSampler, "random": optuna.samplers.RandomSampler}


@pytest.mark.parametrize("name", SAMPLERS)
def test_the_spec_names_the_sampler(name: str) -> None:
    spec = parse_spec({"study": {"name": "s", "trials": 12}, "model": {"preset": "lenet300"},
                       "data": {"preset": "digits"}, "search": {"sampler": name}})
    assert isinstance(make_sampler(spec, 0), KIND[name])


def test_the_gaussian_process_sampler_models_the_two_objectives(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    modelled: list[dict[str, object]] = []
    relative = optuna.samplers.GPSampler.sample_relative

    def spy(self: optuna.samplers.GPSampler, *args: object) -> dict[str, object]:
        params = relative(self, *args)
        modelled.append(params)
        return params

    monkeypatch.setattr(optuna.samplers.GPSampler, "sample_relative", spy)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = slimtune.search(_trained(SmallNet()), DigitsDataModule(), study="gp", storage=url, trials=6, space=SPACE,
                            search={"sampler": "gp", "seed": {"plans": 0, "uniform": 0}},
                            **SETTINGS)  # no seeds: 4 random start-up trials, then 2 from the GP
    trials = study.optuna_study.trials
    assert len(trials) == 6 and all(t.state != optuna.trial.TrialState.FAIL for t in trials)
    fitted = [p for p in modelled if p]
    assert fitted and all(any(t.params == {**t.params, **p} for t in trials) for p in fitted)  # the GP's own plans ran
