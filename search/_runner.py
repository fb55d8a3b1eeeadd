"""Launching and resuming a search: validate, open the study, get the teacher, run trials.

``--trials N`` is the number of finished (COMPLETE or PRUNED) trials the study should hold, so
running the same command again continues where it stopped, and failed trials are replaced.

Example::

    spec = resolve_spec(preset="cnn-digits", trials=5)
    summary = launch(spec)              # a new study, or the same one continued
    summary = resume("cnn-digits", "sqlite:///slimtune.db", trials=8)
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from slimtune.spaces import SpecError, StudySpec, load_spec_file, parse_spec, select_layers
from slimtune.studies import (
    best_ratio_within, finished_count, get_blob, keys, load_existing_study, load_preset, mask_url, open_storage,
    put_blob,
)
from slimtune.trainers import (
    TrialContext, build_datamodule, build_model, compressible_layers, dense_parameter_bytes, evaluate,
    load_state_bytes, silence_lightning, state_to_bytes, train_teacher,
)

from ._objective import CompressionObjective, TrialFailed
from ._signals import GracefulStop, Interrupted

MAX_FAILURES_IN_A_ROW = 5
VERSION = "0.1.0"


@dataclass
class SearchSummary:
    """How a search run ended."""

    study_name: str
    storage: str
    finished: int
    target: int
    ran: int
    seconds: float
    stopped_by: str | None = None


def resolve_spec(spec_path: str | None = None, preset: str | None = None, **overrides: Any) -> StudySpec:
    """The spec from a TOML file or a preset, with study-level command-line overrides applied."""
    if (spec_path is None) == (preset is None):
        raise SpecError("SPEC / --preset", spec_path or preset, "exactly one: a TOML file or --preset NAME")
    spec = load_spec_file(spec_path) if spec_path else parse_spec(load_preset(str(preset)))
    return spec.with_overrides(**overrides)


def make_sampler(spec: StudySpec, already: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded with the spec seed and the trial count so far (so a resumed
    study does not replay the random start-up trials it already ran)."""
    seed = (spec.seed * 1_000_003 + already) % (2**31)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, spec.trials // 4)))
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                      n_startup_trials=max(4, min(10, spec.trials // 3)))


def _check_runtime(spec: StudySpec) -> tuple[torch.nn.Module, Any]:
    """Build the model and data and match the layer patterns: every SpecError before any write."""
    model = build_model(spec.model)
    dm = build_datamodule(spec.data)
    select_layers(compressible_layers(model), spec.space)
    return model, dm


def _open_study(spec: StudySpec, storage: optuna.storages.BaseStorage, force: bool) -> optuna.Study:
    names = optuna.get_all_study_names(storage)
    if spec.name in names:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        stored = study.user_attrs.get(keys.FINGERPRINT)
        if stored is None:
            raise SpecError("study.name", spec.name, "a slimtune study or a new name",
                            "names an existing study that slimtune did not create")
        if stored != spec.fingerprint() and not force:
            raise SpecError("spec", spec.name, "the spec the study was created with (or --force to continue anyway, "
                            "or a new study name)",
                            f"differs from the study's stored spec (fingerprint {spec.fingerprint()} != {stored})")
        if stored != spec.fingerprint() or study.user_attrs.get(keys.SPEC) != spec.to_dict():
            study.set_user_attr(keys.SPEC, spec.to_dict())  # e.g. a new target trial count
            study.set_user_attr(keys.FINGERPRINT, spec.fingerprint())
        return study
    study = optuna.create_study(study_name=spec.name, storage=storage, directions=keys.DIRECTIONS)
    study.set_metric_names(keys.METRIC_NAMES)
    study.set_user_attr(keys.SPEC, spec.to_dict())
    study.set_user_attr(keys.FINGERPRINT, spec.fingerprint())
    study.set_user_attr(keys.VERSION, VERSION)
    return study


def _teacher(study: optuna.Study, storage: optuna.storages.BaseStorage, spec: StudySpec, model: torch.nn.Module,
             dm: Any, stop: GracefulStop, log: Any) -> torch.nn.Module:
    """The study's teacher: from the database if stored, else trained (or the checkpoint) and stored."""
    blob = get_blob(storage, spec.name, keys.TEACHER_BLOB)
    if blob is not None:
        return load_state_bytes(model, blob)
    started = time.perf_counter()
    if spec.model.checkpoint:
        source = f"checkpoint {spec.model.checkpoint}"
    else:
        log(f"training the teacher ({spec.teacher.epochs} epochs) ...")
        with stop.trial_body():
            train_teacher(model, dm, spec.teacher, spec.seed)
        source = "trained"
    info = {
        "val_accuracy": evaluate(model, dm.val_dataloader()),
        "test_accuracy": evaluate(model, dm.test_dataloader()),
        "dense_bytes": dense_parameter_bytes(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - started,
        "source": source,
    }
    put_blob(storage, spec.name, keys.TEACHER_BLOB, state_to_bytes(model))
    study.set_user_attr(keys.TEACHER, info)
    log(f"teacher: val {100 * info['val_accuracy']:.2f}%, test {100 * info['test_accuracy']:.2f}%, "
        f"{info['dense_bytes']:,} bytes fp32 ({info['seconds']:.1f} s)")
    return model.eval()


def _progress(study: optuna.Study, target: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    bar = tqdm(total=target, initial=initial, desc=study.study_name, unit="trial", disable=not enabled,
               file=sys.stderr, dynamic_ncols=True)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            bar.update(1)
        best = best_ratio_within(study, 0.01)
        bar.set_postfix_str(f"best within 1pt: {best:.1f}x" if best else "best within 1pt: -")

    return bar, callback


def run_study(spec: StudySpec, force: bool = False, timeout: float | None = None, threads: int | None = None,
              progress: bool = True, log: Any = None) -> SearchSummary:
    """Run ``spec``'s study until it holds ``spec.trials`` finished trials (or ``timeout`` s pass)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    silence_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    model, dm = _check_runtime(spec)
    storage = open_storage(spec.storage)
    started = time.perf_counter()
    ran = 0
    study: optuna.Study | None = None
    with GracefulStop() as stop:
        try:
            study = _open_study(spec, storage, force)
            teacher = _teacher(study, storage, spec, model, dm, stop, log)
            floor = study.user_attrs[keys.TEACHER]["val_accuracy"] - spec.max_accuracy_drop
            context = TrialContext.create(spec, teacher, floor=floor, datamodule=dm)
            objective = CompressionObjective(context, storage, stop)
            finished = finished_count(study)
            bar, on_trial = _progress(study, spec.trials, finished, progress)
            failures_in_a_row = 0

            def count_failures(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                nonlocal failures_in_a_row, ran
                ran += 1
                failures_in_a_row = failures_in_a_row + 1 if trial.state == TrialState.FAIL else 0
                if stop.requested or failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    study.stop()

            with bar:
                while finished < spec.trials and not stop.requested:
                    left = None if timeout is None else timeout - (time.perf_counter() - started)
                    if left is not None and left <= 0:
                        break
                    study.sampler = make_sampler(spec, len(study.get_trials(deepcopy=False)))
                    study.optimize(objective, n_trials=spec.trials - finished, timeout=left, catch=(TrialFailed,),
                                   callbacks=[on_trial, count_failures], gc_after_trial=False)
                    finished = finished_count(study)
                    if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                        last = study.get_trials(deepcopy=False)[-1].user_attrs.get(keys.TRIAL_FAIL_REASON)
                        raise RuntimeError(f"{MAX_FAILURES_IN_A_ROW} trials in a row failed; the last: {last}")
        except Interrupted as exc:
            finished = finished_count(study) if study is not None else 0
            return SearchSummary(spec.name, mask_url(spec.storage), finished, spec.trials, ran,
                                 time.perf_counter() - started, stopped_by=str(exc))
        stopped = f"interrupted by {stop.signal_name}" if stop.requested else None
    return SearchSummary(spec.name, mask_url(spec.storage), finished, spec.trials, ran,
                         time.perf_counter() - started, stopped_by=stopped)


def load_stored_spec(study_name: str, storage_url: str) -> StudySpec:
    """The spec stored in an existing study; the storage URL given here replaces the stored one."""
    attrs = load_existing_study(study_name, storage_url).user_attrs
    if keys.SPEC not in attrs:
        raise SpecError("--study", study_name, "a study created by slimtune", "has no slimtune spec")
    return parse_spec(attrs[keys.SPEC]).with_overrides(storage=storage_url)
