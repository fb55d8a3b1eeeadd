"""Shared fixtures: a tiny digits study spec, and a teacher trained on it once per session."""

from __future__ import annotations

import copy
import importlib.util
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from slimtune.spaces import StudySpec, parse_spec

DIGITS_SPEC: dict[str, Any] = {
    "study": {"name": "digits-test", "trials": 3, "seed": 0, "max_accuracy_drop": 0.5},
    "model": {"preset": "cnn-digits"},
    "data": {"preset": "digits"},
    "teacher": {"epochs": 8, "batch_size": 32, "lr": 2e-3},
    "finetune": {"epochs": 1, "batch_size": 64},
    "space": {
        "prune_ratio": {"low": 0.2, "high": 0.8},
        "weight_bits": {"choices": [2, 4, 8, 32]},
        "kd_temperature": {"low": 1.0, "high": 4.0},
        "lr": {"fixed": 2e-3},
    },
}

SPEC_TOML = """
[study]
name = "digits-test"
trials = 3
seed = 0
max_accuracy_drop = 0.5

[model]
preset = "cnn-digits"

[data]
preset = "digits"

[teacher]
epochs = 8
batch_size = 32
lr = 2e-3

[finetune]
epochs = 1
batch_size = 64

[space]
prune_ratio = { low = 0.2, high = 0.8 }
weight_bits = { choices = [2, 4, 8, 32] }
kd_temperature = { low = 1.0, high = 4.0 }
lr = { fixed = 2e-3 }
"""


def without_seeds(toml: str) -> str:
    """``toml`` with ``[search.seed]`` off, for a test of what the sampler itself does (the seeds,
    on by default, would fill a few-trial study)."""
    assert "\n[model]" in toml, "without_seeds puts [search.seed] before the spec's [model] table"
    return toml.replace("\n[model]", "\n[search.seed]\nplans = 0\nuniform = 0\n\n[model]", 1)


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module, importing its neighbours as it does when run by hand.

    Example: ``load_benchmark("search_goal").RATIO_GOAL == 1.3``.
    """
    folder = Path(__file__).parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def digits_spec_dict(**study: Any) -> dict[str, Any]:
    data = copy.deepcopy(DIGITS_SPEC)
    data["study"].update(study)
    return data


def toy_model_and_loader() -> tuple[torch.nn.Module, torch.utils.data.DataLoader]:
    """A seeded 16-32-4 MLP and a 256-sample loader whose label is the argmax of 4 inputs."""
    from slimtune.trainers import batch_loader

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(256, 16)
    y = (x[:, :4]).argmax(1)
    return model, batch_loader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True, seed=0)


@pytest.fixture
def digits_spec() -> StudySpec:
    return parse_spec(digits_spec_dict())


@pytest.fixture(scope="session")
def digits_teacher() -> tuple[Any, Any]:
    """(teacher, datamodule) for the tiny digits spec, trained once per test session."""
    from slimtune.trainers import build_datamodule, build_model, train_teacher

    spec = parse_spec(digits_spec_dict())
    dm = build_datamodule(spec.data)
    teacher = train_teacher(build_model(spec.model), dm, spec.teacher, seed=0)
    return teacher, dm


def copy_database(source: Path, target: Path) -> Path:
    """A consistent copy of a SQLite study database (WAL folded in), in its own file."""
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
    return target


def searched(folder: Path, spec_text: str, db: str = "studies.db") -> str:
    """The storage URL of a SQLite database in ``folder`` holding the finished search of the spec
    ``spec_text`` (``slimtune search``, one torch thread, quiet)."""
    from slimtune.search import main

    spec = folder / "study.toml"
    spec.write_text(spec_text)
    url = f"sqlite:///{folder / db}"
    assert main(["search", str(spec), "--storage", url, "--threads", "1", "--quiet"]) == 0
    return url


@pytest.fixture(scope="session")
def digits_study_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-trial digits search (one torch thread), searched once per session: copy it
    (:func:`copy_database`) before changing it."""
    folder = tmp_path_factory.mktemp("digits-study")
    searched(folder, SPEC_TOML)
    return folder / "studies.db"


from .postgres import postgres  # noqa: E402,F401  (the session-wide throwaway PostgreSQL cluster)
