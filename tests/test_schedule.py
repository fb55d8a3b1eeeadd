"""Fine-tune schedules: gradual pruning reaches the planned sparsity exactly, the promotion gate
gives extra epochs only to trials no completed trial beats, and both are reachable from a spec."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import optuna
import pytest
import torch
from optuna.trial import TrialState

from slimtune.search import main
from slimtune.search._objective import beaten_by_completed
from slimtune.spaces import CompressionPlan, LayerPlan, SpecError, parse_spec
from slimtune.studies import keys
from slimtune.trainers import (
    DistillationModule, GradualPruning, PromotionGate, TrialContext, apply_plan, cubic_sparsity, quiet_trainer,
    run_trial, weight_averaging,
)

from .conftest import SPEC_TOML, digits_spec_dict, toy_model_and_loader


def _plan(ratio: float, bits: int = 32) -> CompressionPlan:
    return CompressionPlan({"0": LayerPlan(prune_ratio=ratio, weight_bits=bits, kd_temperature=2.0),
                            "2": LayerPlan(prune_ratio=ratio / 2, weight_bits=bits, kd_temperature=2.0)},
                           kd_alpha=1.0, feature_kd_weight=0.0, lr=1e-2)


def test_cubic_ramp_is_monotone_and_ends_at_the_target() -> None:
    values = [cubic_sparsity(0.8, step, 40) for step in range(0, 50)]
    assert values[0] == 0.0 and values[40:] == [0.8] * 10
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[10] > 0.8 * 10 / 40  # cubic: most of the pruning happens early


@pytest.mark.parametrize("bits", [32, 4])
def test_gradual_pruning_starts_dense_and_ends_at_the_planned_ratio(bits: int) -> None:
    model, loader = toy_model_and_loader()
    teacher = copy.deepcopy(model).eval()
    student = apply_plan(model, _plan(0.75, bits))
    planned = {n: int((student.get_submodule(n).parametrizations["weight"][0].mask == 0).sum()) for n in ("0", "2")}
    ramp = GradualPruning(student, ramp_steps=12, every=3)
    assert all(int((m.mask == 0).sum()) == 0 for _, m, _ in ramp.targets)  # dense at step 0
    seen: list[int] = []
    module = DistillationModule(student, lr=1e-2, kd_alpha=1.0, logit_temperature=2.0, feature_kd_weight=0.0,
                                feature_temperatures={}, teacher=teacher)

    class Record(pl.Callback):  # a plain Callback recording fc1's zeros each step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            seen.append(int((student.get_submodule("0").parametrizations["weight"][0].mask == 0).sum()))

    quiet_trainer(2, seed=0, callbacks=[ramp, Record()]).fit(module, train_dataloaders=loader)
    assert seen[0] == 0 and seen[-1] == planned["0"] and seen == sorted(seen)
    assert len(set(seen)) > 3  # it grew in steps, not at once
    for name, zeros in planned.items():
        weight = student.get_submodule(name).weight
        assert int((weight == 0).sum()) >= zeros  # exactly the planned mask (quantization may add zeros)
        assert int((student.get_submodule(name).parametrizations["weight"][0].mask == 0).sum()) == zeros


def test_a_run_stopped_early_still_ends_at_the_planned_ratio() -> None:
    model, loader = toy_model_and_loader()
    student = apply_plan(model, _plan(0.5))
    ramp = GradualPruning(student, ramp_steps=10_000)  # would never finish within 1 epoch
    module = DistillationModule(student, lr=1e-2, kd_alpha=1.0, logit_temperature=2.0, feature_kd_weight=0.0,
                                feature_temperatures={}, teacher=copy.deepcopy(model).eval())
    quiet_trainer(1, seed=0, callbacks=[ramp]).fit(module, train_dataloaders=loader)
    mask = student.get_submodule("0").parametrizations["weight"][0].mask
    assert int((mask == 0).sum()) == round(0.5 * mask.numel())


@pytest.mark.parametrize("decision", [True, False])
def test_promotion_gate_trains_on_only_when_promoted_with_a_decaying_lr(decision: bool) -> None:
    model, loader = toy_model_and_loader()
    student = apply_plan(model, _plan(0.5))
    module = DistillationModule(student, lr=1e-2, kd_alpha=1.0, logit_temperature=2.0, feature_kd_weight=0.0,
                                feature_temperatures={}, teacher=copy.deepcopy(model).eval())
    asked: list[int] = []
    gate = PromotionGate(2, lambda: asked.append(len(module.val_history)) or decision)
    lrs: list[float] = []

    class LrLog(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    quiet_trainer(6, seed=0, callbacks=[gate, LrLog()]).fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert asked == [2] and gate.promoted is decision
    assert len(module.val_history) == (6 if decision else 2)
    if decision:
        assert lrs[:3] == [1e-2, 1e-2, 1e-2]  # base epochs, then the first extra one at full lr
        assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0


def _study_with(points: list[tuple[float, float, list[float] | None]]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for accuracy, size, history in points:
        attrs = {keys.TRIAL_VAL_HISTORY: history} if history is not None else {}
        study.add_trial(optuna.trial.create_trial(values=[accuracy, size], distributions={}, params={},
                                                  user_attrs=attrs))
    return study


def test_promotion_rule_asks_for_a_smaller_and_clearly_better_trial() -> None:
    promote = beaten_by_completed(_study_with([(0.95, 1000.0, None), (0.90, 500.0, None)]), margin=0.01,
                                  base_epochs=2)
    assert not promote(0.93, 1000)  # 0.95 at the same size beats it by more than the margin
    assert promote(0.945, 1000)  # within the margin: worth more epochs
    assert promote(0.93, 999)  # smaller than the accurate one; the small one is less accurate
    assert not promote(0.85, 600)  # the 500-byte trial beats it
    assert beaten_by_completed(_study_with([]), margin=0.0, base_epochs=2)(0.1, 10)  # nothing to compare with yet


def test_promotion_rule_compares_at_equal_fidelity() -> None:
    # a promoted trial reached 0.97 after 6 epochs but was at 0.93 after the base 2
    study = _study_with([(0.97, 1000.0, [0.92, 0.93, 0.95, 0.96, 0.965, 0.97])])
    promote = beaten_by_completed(study, margin=0.002, base_epochs=2)
    assert promote(0.931, 1000)  # as good as it was at the same point: promoted
    assert not promote(0.92, 1000)


def test_size_tolerance_lets_slightly_larger_trials_compete() -> None:
    study = _study_with([(0.95, 1100.0, None)])
    assert beaten_by_completed(study, margin=0.0, base_epochs=2)(0.93, 1000)  # larger: no competitor
    assert not beaten_by_completed(study, margin=0.0, base_epochs=2, size_tolerance=1.2)(0.93, 1000)
    assert beaten_by_completed(study, margin=0.0, base_epochs=2, size_tolerance=1.05)(0.93, 1000)


def _set(data: dict, dotted: str, value: object) -> dict:
    """``data`` with the key at ``dotted`` (``"method.prune.schedule"``) set to ``value``."""
    *path, key = dotted.split(".")
    node = data
    for part in path:
        node = node.setdefault(part, {})
    node[key] = value
    return data


def test_schedule_settings_are_validated_and_old_specs_keep_their_fingerprint() -> None:
    base = parse_spec(digits_spec_dict())
    data = digits_spec_dict()
    data.update(method={"prune": {"schedule": "gradual", "ramp": 0.5}}, search={"promote": {"epochs": 2}})
    changed = parse_spec(data)
    assert changed.method("prune").schedule == "gradual" and changed.search.promote.epochs == 2
    assert changed.fingerprint() != base.fingerprint()
    # the defaults written out keep the fingerprint (the quantizer's default is "lsq" since 0.2)
    neutral = digits_spec_dict()
    neutral.update(method={"prune": {"schedule": "oneshot"}, "quantize": {"quantizer": "lsq"}},
                   search={"promote": {"epochs": 0, "size_tolerance": 1.0}})
    assert parse_spec(neutral).fingerprint() == base.fingerprint()
    old_default = _set(digits_spec_dict(), "method.quantize.quantizer", "amax")
    assert parse_spec(old_default).fingerprint() != base.fingerprint()
    for key, value, allowed in [("method.prune.schedule", "cubic", '"oneshot", "gradual"'),
                                ("method.prune.ramp", 0, "0"), ("search.promote.epochs", -1, "0"),
                                ("search.promote.margin", 2, "1"),
                                ("method.quantize.quantizer", "kmeans", '"amax", "lsq"'),
                                ("search.promote.size_tolerance", 0.5, "1")]:
        bad = _set(digits_spec_dict(), key, value)
        with pytest.raises(SpecError, match=key) as err:
            parse_spec(bad)
        assert allowed in str(err.value)


def test_gradual_promoted_lsq_trials_end_to_end(tmp_path: Path, digits_teacher) -> None:  # type: ignore[no-untyped-def]
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(SPEC_TOML.replace("[finetune]\nepochs = 1",
                                           "[method.prune]\nschedule = \"gradual\"\n\n[method.quantize]\n"
                                           "quantizer = \"lsq\"\n\n[search.promote]\nepochs = 1\n\n"
                                           "[finetune]\nepochs = 1"))
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["search", str(spec_file), "--storage", url, "--trials", "4", "--quiet"]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete and complete[0].user_attrs[keys.TRIAL_PROMOTED] is True  # nothing to beat it yet
    for trial in complete:
        epochs = len(trial.user_attrs[keys.TRIAL_VAL_HISTORY])
        assert epochs == (2 if trial.user_attrs[keys.TRIAL_PROMOTED] else 1)
        for name, layer in trial.user_attrs[keys.TRIAL_LAYERS].items():
            planned = trial.user_attrs[keys.TRIAL_PLAN]["layers"][name]["prune_ratio"]
            zeros = layer["sparsity"] * layer["weights"]
            assert zeros >= planned * layer["weights"] - 0.5 - 1e-6  # the ramp reached the plan


class _RecordWeights(pl.Callback):
    """The student's weights after every training step (a test probe)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.history = model, []  # type: ignore[var-annotated]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.history.append([p.detach().clone() for p in self.model.parameters()])


def test_weight_average_hands_the_student_its_moving_average_when_training_ends() -> None:
    model, loader = toy_model_and_loader()
    teacher = copy.deepcopy(model).eval()
    student = apply_plan(model, _plan(0.5, 4))
    average = weight_averaging(0.9)
    probe = _RecordWeights(student)
    module = DistillationModule(student, lr=5e-2, kd_alpha=1.0, logit_temperature=2.0, feature_kd_weight=0.0,
                                feature_temperatures={}, teacher=teacher)
    quiet_trainer(2, seed=0, callbacks=[probe, average]).fit(module, train_dataloaders=loader)
    expected = probe.history[0]
    for step, weights in enumerate(probe.history[1:], start=1):
        keep = min(0.9, (1 + step) / (10 + step))
        expected = [e * keep + w * (1 - keep) for e, w in zip(expected, weights)]
    assert len(probe.history) == 16  # 2 epochs of 8 batches
    for got, want, last in zip(student.parameters(), expected, probe.history[-1]):
        assert torch.allclose(got, want, atol=1e-6)
        assert not torch.allclose(got, last)  # the average, not the last step's weights
    with pytest.raises(ValueError, match="decay must be in"):
        weight_averaging(1.0)


def test_weight_ema_is_a_spec_setting_that_a_trial_uses(digits_teacher) -> None:  # type: ignore[no-untyped-def]
    base = parse_spec(digits_spec_dict())
    data = digits_spec_dict()
    data["finetune"]["weight_ema"] = 0.99
    spec = parse_spec(data)
    assert spec.finetune.weight_ema == 0.99 and spec.fingerprint() != base.fingerprint()
    assert parse_spec(spec.to_dict()).finetune.weight_ema == 0.99
    data["finetune"]["weight_ema"] = 0.0
    assert parse_spec(data).fingerprint() == base.fingerprint()  # off: old studies keep their fingerprint
    data["finetune"]["weight_ema"] = 1.0
    with pytest.raises(SpecError, match="finetune.weight_ema") as err:
        parse_spec(data)
    assert "[0, 0.9999]" in str(err.value)

    teacher, dm = digits_teacher
    results = {}
    for name, which in (("plain", base), ("ema", spec)):
        ctx = TrialContext.create(which, teacher, datamodule=dm)
        results[name] = run_trial(ctx, CompressionPlan(
            {n: LayerPlan(prune_ratio=0.5, weight_bits=4, kd_temperature=2.0) for n in ctx.layer_names},
            kd_alpha=1.0, feature_kd_weight=0.0, lr=2e-3), seed=0)
    # validation judges the averaged weights: what the trial packs (and its val accuracy measures)
    assert results["ema"].val_history[-1] == results["ema"].val_accuracy
    assert results["ema"].val_history != results["plain"].val_history
    assert results["ema"].artifact != results["plain"].artifact
    assert results["ema"].size_bytes == len(results["ema"].artifact)


def test_weight_average_benchmark_refuses_bad_input_before_running_anything(tmp_path: Path) -> None:
    script = Path(__file__).parents[1] / "benchmarks" / "weight_average.py"
    out = tmp_path / "wa.json"
    for extra, message in ((["--decays", "0,1.5"], "--decays '0,1.5'"),
                           (["--storage", f"sqlite:///{tmp_path / 'none.db'}"], "none.db does not exist")):
        done = subprocess.run([sys.executable, str(script), "--out", str(out), "--no-results-md", *extra],
                              capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not out.exists() and not (tmp_path / "none.db").exists()
