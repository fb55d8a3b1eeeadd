"""Settings declared once: sections, every error at once, moved keys, neutral values and the
fingerprint, the new L2 loss term."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from slimtune.spaces import (
    MISSING,
    Section,
    Setting,
    SpecError,
    SpecErrors,
    parse_spec,
    regular_sections,
)
from slimtune.trainers import DistillationModule

from .conftest import digits_spec_dict


def test_every_error_of_a_spec_is_reported_at_once() -> None:
    data = digits_spec_dict()
    data["study"]["trials"] = 0
    data["finetune"]["epochs"] = "two"
    data["method"] = {"prune": {"schedule": "sometimes"}, "quantize": {"bits": 4}}
    data["space"]["prune_ratio"] = {"low": 0.5, "high": 2.0}
    data["runtime"] = {"heartbeat_interval": 30, "heartbeat_grace": 10}
    with pytest.raises(SpecErrors) as info:
        parse_spec(data)
    message = str(info.value)
    assert message.startswith("6 problems in the spec:")
    for key in ("study.trials", "finetune.epochs", "method.prune.schedule", "method.quantize.bits",
                "space.prune_ratio.high", "runtime.heartbeat_grace"):
        assert f"\n  {key}: " in message, key
    assert [e.key for e in info.value.errors][0] == "study.trials"


@pytest.mark.parametrize(("section", "key", "value", "where"), [
    ("finetune", "prune_schedule", "gradual", "method.prune.schedule"),
    ("finetune", "quantizer", "lsq", "method.quantize.quantizer"),
    ("finetune", "refine_epochs", 4, "search.refine.epochs"),
    ("finetune", "promote_epochs", 2, "search.promote.epochs"),
    ("finetune", "cache_mb", 10, "runtime.cache_mb"),
    ("study", "sampler", "nsga2", "search.sampler"),
    ("study", "heartbeat_grace", 90, "runtime.heartbeat_grace"),
])
def test_a_key_that_moved_says_where_it_lives_now(section: str, key: str, value: Any, where: str) -> None:
    data = digits_spec_dict()
    data.setdefault(section, {})[key] = value
    with pytest.raises(SpecError, match=rf"{section}\.{key}: .* has moved \(since slimtune 0\.2\); "
                                        rf"allowed: the key {where.replace('.', '[.]')}"):
        parse_spec(data)


def test_settings_at_their_neutral_value_keep_the_fingerprint() -> None:
    base = parse_spec(digits_spec_dict())
    for section in regular_sections():
        for setting in section.settings:
            if setting.neutral is MISSING or not setting.fingerprinted:
                continue
            data = copy.deepcopy(base.to_dict())
            node = data
            for part in section.name.split("."):
                node = node[part]
            changed = not setting.is_neutral(node[setting.key])
            node[setting.key] = setting.neutral
            neutral = parse_spec(data).fingerprint()
            # absent (a spec written before the setting existed) is the same as neutral
            del node[setting.key]
            if setting.default == setting.neutral:
                assert parse_spec(data).fingerprint() == neutral, f"{section.name}.{setting.key}"
            if changed:
                assert neutral != base.fingerprint(), f"{section.name}.{setting.key} changes what a trial means"


def test_scheduling_and_runtime_settings_leave_the_fingerprint_alone() -> None:
    base = parse_spec(digits_spec_dict())
    data = digits_spec_dict()
    data["search"] = {"sampler": "tpe", "refine": {"epochs": 9, "top": 2}, "promote": {"epochs": 3}}
    data["runtime"] = {"cache_mb": 7, "heartbeat_interval": 5, "heartbeat_grace": 11}
    assert parse_spec(data).fingerprint() == base.fingerprint()
    data["search"]["sampler"] = "random"  # a different sampler makes different trials: kept in
    assert parse_spec(data).fingerprint() != base.fingerprint()


def test_a_section_checks_types_ranges_and_choices() -> None:
    section = Section("demo", "a demo", (
        Setting("n", int, 1, "a count", low=1, high=5),
        Setting("x", float, 0.5, "a share", low=0.0, high=1.0, low_open=True),
        Setting("mode", str, "a", "a mode", choices=("a", "b")),
        Setting("flag", bool, False, "a flag"),
    ))
    from slimtune.spaces import Errors

    errors = Errors()
    values = section.parse({"n": True, "x": 0.0, "mode": "c", "flag": 1, "other": 3}, errors)
    assert values == section.defaults()
    assert [str(e) for e in errors.errors] == [
        "demo.n: True is not allowed; allowed: an integer in [1, 5]",
        "demo.x: 0.0 is not allowed; allowed: a number in (0, 1]",
        "demo.mode: 'c' is not allowed; allowed: \"a\", \"b\"",
        "demo.flag: 1 is not allowed; allowed: true or false",
        "demo.other: 3 is not a known key; allowed: keys ['flag', 'mode', 'n', 'x']",
    ]


def test_the_l2_term_is_a_searched_knob_off_by_default() -> None:
    base = parse_spec(digits_spec_dict())
    assert base.space.knobs["l2_weight"].fixed == 0.0
    data = digits_spec_dict()
    data["space"]["l2_weight"] = {"low": 0.0, "high": 0.1}
    assert parse_spec(data).fingerprint() != base.fingerprint()
    student = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with torch.no_grad():
        student[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]]))
    module = DistillationModule(student, lr=1e-3, kd_alpha=1.0, logit_temperature=1.0, feature_kd_weight=0.0,
                                feature_temperatures={}, teacher=torch.nn.Sequential(torch.nn.Linear(3, 2)),
                                l1_layers=["0"], l2_weight=0.5)
    assert float(module.l2_penalty().detach()) == pytest.approx((1 + 4 + 9) / 6)
    assert float(module.l1_penalty().detach()) == pytest.approx((1 + 2 + 3) / 6)
