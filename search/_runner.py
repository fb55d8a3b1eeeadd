"""Launching and resuming a search: validate, open the study, get the teacher, run trials.

``--trials N`` is the number of finished (COMPLETE or PRUNED) trials the study should hold, so
running the same command again continues where it stopped, and failed trials are replaced.

Example::

    spec = resolve_spec(preset="cnn-digits", trials=5)
    summary = run_study(spec)                       # a new study, or the same one continued
    summary = run_study(load_stored_spec("cnn-digits", "sqlite:///slimtune.db").with_overrides(trials=8))
    summary = run_workers(spec, workers=4)          # four local worker processes
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
import torch

import slimtune

from slimtune.spaces import (
    TRUST_ENV, SpecError, StudySpec, is_v01_spec, load_spec_file, module_of, parse_spec, select_layers,
    upgrade_stored_spec,
)
from slimtune.studies import (
    annotate_study, best_ratio_within, claim_blob, delete_blobs, drop_blob, finished_count, get_blob, is_in_memory,
    keys, load_existing_study, load_preset, mask_url, open_storage, publish_figures, records, touch_blob,
)
from slimtune.trainers import (
    MODEL_OUTPUT, TrialContext, build_datamodule, build_model, check_accelerator, check_finite_weights,
    check_logged_metric, check_logger, check_model_and_data, compressible_layers, datamodule_info,
    dense_parameter_bytes, evaluate, example_batch, first_parameter_difference, import_ref, load_state_bytes, method,
    prepare_datamodule, run_logger, silence_lightning, state_to_bytes, train_teacher, uncompressed_weights,
    unit_groups,
)

from ._cmd_export import require_onnx_extra
from ._env import EXIT_INTERRUPTED, RUN_ENV, STORAGE_ENV
from ._goal import GoalReached, goal_of
from ._loop import every, run_until_target
from ._objective import CompressionObjective
from ._refine import refine_until_deadline
from ._seeding import seed_calibrated, seed_study
from ._signals import GracefulStop, Interrupted, SearchFailed

STUDY_SETUP_WAIT_S = 30.0
TEACHER_LOCK_REFRESH_S = 30.0
# A lock of another host is stale once it has not changed for this long, on this host's clock.
TEACHER_LOCK_STALE_S = 3 * TEACHER_LOCK_REFRESH_S


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
    failed_workers: int = 0
    goal: str | None = None  # why an accuracy goal ended the search (study.goal_drop), if it did


def resolve_spec(spec_path: str | None = None, preset: str | None = None, **overrides: Any) -> StudySpec:
    """The spec from a TOML file or a preset, with study-level command-line overrides applied."""
    if (spec_path is None) == (preset is None):
        raise SpecError("SPEC / --preset", spec_path or preset, "exactly one: a TOML file or --preset NAME")
    spec = load_spec_file(spec_path) if spec_path else parse_spec(load_preset(str(preset)))
    return spec.with_overrides(**overrides)


def make_sampler(spec: StudySpec, trial_number: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler for the trial about to be numbered ``trial_number``, seeded with the
    spec seed and that number: a search is reproducible, a resumed study does not replay its
    random start-up trials, and workers that start together do not sample the same plans."""
    seed = (spec.seed * 1_000_003 + trial_number) % (2**31)
    if spec.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = max(4, min(10, spec.trials // 3))
    if spec.search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, spec.trials // 4)))
    if spec.search.sampler == "gp":  # Optuna's Gaussian-process sampler (multi-objective: log EHVI)
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                      n_startup_trials=startup)


Given = tuple[torch.nn.Module, Any]
"""A model and a data module given as Python objects (``slimtune.search``): the spec's
``model.given`` and ``data.given`` describe them."""


def _check_runtime(spec: StudySpec, load_checkpoint: bool = True,
                   given: Given | None = None) -> tuple[torch.nn.Module, Any]:
    """Build the model and data and match the layer patterns: every SpecError before any write.

    A worker joining a study whose teacher is stored skips the checkpoint (``load_checkpoint``
    False): the database holds the teacher, the file need not exist on its machine. ``given``:
    the objects ``slimtune.search`` was handed (a copy of the model is used; the caller's is
    never changed), in place of what the spec names.
    """
    given_model, given_data = given if given is not None else (None, None)
    if spec.deploy is not None:  # every trial exports and times its ONNX file
        require_onnx_extra("objective.deploy", spec.deploy)
    if given_data is not None:
        dm = prepare_datamodule(given_data, "datamodule", spec.data.given)
    else:
        dm = build_datamodule(spec.data, regression=spec.metric.regression)
    if given_model is not None:
        model = copy.deepcopy(given_model).cpu()
        if spec.model.factory:  # what other processes will build: the same parameters, or refused now
            _check_factory_builds(spec, model, dm)
        if spec.data.module:
            import_ref(spec.data.module, "data.module", spec.data.source)
    else:
        torch.manual_seed(spec.seed)  # the teacher's initial weights follow the spec's seed
        model = build_model(spec.model, data_info=datamodule_info(dm), load_checkpoint=load_checkpoint)
    check_logger(spec.runtime)
    check_accelerator(spec.runtime)
    loaded = given_model is not None or (load_checkpoint and spec.model.checkpoint is not None)
    check_model_and_data(model, dm, loaded_weights=loaded, regression=spec.metric.regression)
    check_logged_metric(model, dm, spec.metric)
    _check_layer_patterns(model, spec, example_batch(dm)[:2])  # after: it traces a forward pass
    _warn_uncompressed(model)
    return model, dm


def _check_layer_patterns(model: torch.nn.Module, spec: StudySpec, example: torch.Tensor) -> list[str]:
    """The compressed layers, by the space's patterns (a SpecError when none is left). Modules the
    patterns name that no method can compress, and layers whose units ``unit_ratio`` cannot drop
    (with the reason), are said in a warning rather than searched without a word."""
    compressible = compressible_layers(model)
    others = [name for name, _ in model.named_modules() if name and name not in compressible]
    chosen = select_layers(compressible, spec.space, others)
    held = [n for n in others if any(p.numel() for p in model.get_submodule(n).parameters(recurse=False))
            and any(fnmatchcase(n, p) for p in spec.space.layers) and spec.space.layers != ("*",)]
    if held:
        listed = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in held[:8])
        print(f"slimtune: warning: space.layers matches {len(held)} module{'s' * (len(held) != 1)} no method "
              f"compresses, stored as they are: {listed}{' and more' if len(held) > 8 else ''}", file=sys.stderr)
    if method("units").needs_input_rms(spec.method("units"), spec.space):
        groups, untraceable = unit_groups(model, example)
        if untraceable:
            print(f"slimtune: warning: unit_ratio keeps every unit of this model: {untraceable}", file=sys.stderr)
        else:
            outside = {id(g): next((c for c in g.consumers if c not in chosen), None) for g in groups}
            blocked = {p: g.blocked_by or (f"{outside[id(g)]}, outside the plan, reads them" if outside[id(g)]
                                           else "nothing reads them")
                       for g in groups for p in g.producers
                       if p in chosen and (g.blocked_by or not g.consumers or outside[id(g)])
                       and g.blocked_by != MODEL_OUTPUT}
            if blocked:
                listed = "; ".join(f"{n}: {why}" for n, why in list(blocked.items())[:8])
                print(f"slimtune: note: unit_ratio keeps every unit of {len(blocked)} layer"
                      f"{'s' * (len(blocked) != 1)} ({listed})", file=sys.stderr)
    return chosen


def _check_factory_builds(spec: StudySpec, model: torch.nn.Module, dm: Any) -> None:
    """The factory given with a model object must build that model's parameters (names and
    shapes; built without memory), since resume, worker and evaluate will rebuild from it."""
    with torch.device("meta"):
        built = build_model(spec.model, data_info=datamodule_info(dm), load_checkpoint=False)
    differ = first_parameter_difference(model.state_dict(), built.state_dict())
    if differ is not None:
        raise SpecError("model.factory", spec.model.factory, "a factory that builds the model given to slimtune.search "
                        "(the same parameter names and shapes)", f"builds another model (first difference: {differ})")


def _warn_uncompressed(model: torch.nn.Module) -> None:
    """Say which weight tensors no method compresses (they stay float32 in every artifact), and
    their share of the model, instead of searching around them without a word."""
    skipped = uncompressed_weights(model)
    if not skipped:
        return
    share = 4 * sum(values for _, _, values in skipped) / dense_parameter_bytes(model)
    listed = ", ".join(f"{name} ({kind}, {values:,} values)" for name, kind, values in skipped[:8])
    more = f" and {len(skipped) - 8} more" if len(skipped) > 8 else ""
    print(f"slimtune: warning: no method compresses {len(skipped)} weight tensor{'s' * (len(skipped) != 1)} "
          f"({100 * share:.1f}% of the model's fp32 bytes), stored as float32 in every artifact: {listed}{more}; "
          "the methods compress Linear, Conv1d, Conv2d, Embedding, MultiheadAttention and RNN/LSTM/GRU layers",
          file=sys.stderr)


def stored_spec(spec: StudySpec) -> dict[str, Any]:
    """The spec as kept in the study: without the storage URL (each worker brings its own, and
    it may hold a password)."""
    data = spec.to_dict()
    del data["study"]["storage"]
    return data


def _open_study(spec: StudySpec, storage: optuna.storages.BaseStorage, force: bool, log: Any) -> optuna.Study:
    """Create the study, or load it and check that it was made from this spec. A ``trials``
    below the stored target does not lower it (this run then stops at ``spec.trials``)."""
    directions = keys.DIRECTIONS + (["minimize"] if spec.deploy else [])
    try:
        study = optuna.create_study(study_name=spec.name, storage=storage, directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        if len(study.directions) != len(directions):  # even with --force: the objectives are the study's
            raise SpecError("objective.deploy", spec.objective.deploy,
                            f"what study {spec.name} was created with ({len(study.directions)} objectives), or a new "
                            "study name", "changes the study's objectives")
    else:
        delete_blobs(storage, spec.name)  # left by a deleted study of the same name, if any
        study.set_metric_names([spec.metric.objective_name, keys.METRIC_NAMES[1],
                                *([spec.deploy] if spec.deploy else [])])
        study.set_user_attr(keys.SPEC, stored_spec(spec))
        study.set_user_attr(keys.VERSION, slimtune.__version__)
        study.set_user_attr(keys.FINGERPRINT, spec.fingerprint())
        return study
    deadline = time.monotonic() + STUDY_SETUP_WAIT_S  # a worker that created it a moment ago
    while keys.FINGERPRINT not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.2)
    if keys.FINGERPRINT not in study.user_attrs:
        raise SpecError("study.name", spec.name, "a slimtune study or a new name",
                        "names an existing study that slimtune did not create")
    stored = stored_fingerprint(study)
    if is_v01_spec(study.user_attrs.get(keys.SPEC) or {}):
        log(f"study {spec.name} was written by slimtune {study.user_attrs.get(keys.VERSION, '0.1')}: its spec is "
            f"stored again in this version's sections (the same settings)")
    if stored != spec.fingerprint() and not force:
        raise SpecError("spec", spec.name, "the spec the study was created with (or --force to continue anyway, "
                        "or a new study name)",
                        f"differs from the study's stored spec (fingerprint {spec.fingerprint()} != {stored})")
    keep = stored_spec(spec)
    stored_target = (study.user_attrs.get(keys.SPEC) or {}).get("study", {}).get("trials")
    if isinstance(stored_target, int) and spec.trials < stored_target:
        keep["study"]["trials"] = stored_target
        log(f"study {spec.name} keeps its target of {stored_target} trials: --trials {spec.trials} does not lower "
            f"it; this run stops once {spec.trials} have finished")
    if study.user_attrs.get(keys.SPEC) != keep:  # e.g. a new target trial count
        study.set_user_attr(keys.SPEC, keep)
        study.set_user_attr(keys.FINGERPRINT, spec.fingerprint())
    return study


def _teacher(study: optuna.Study, storage: optuna.storages.BaseStorage, spec: StudySpec, model: torch.nn.Module,
             dm: Any, stop: GracefulStop, log: Any, weights_given: bool = False) -> torch.nn.Module:
    """The study's teacher: from the database if stored, else trained (or the checkpoint) and stored.

    Exactly one worker trains it: it claims the ``teacher.lock`` blob and refreshes it every
    ``TEACHER_LOCK_REFRESH_S`` while it trains; the others wait for the weights. A lock whose
    process is gone is taken over at once when it was held on this host, and otherwise once it
    has not changed for ``TEACHER_LOCK_STALE_S`` (measured on this host's clock, so clocks of
    other hosts do not matter). The weights are published insert-if-absent, so a study never
    holds two teachers. ``weights_given``: ``model`` came from ``slimtune.search`` and its own
    weights are the teacher (never trained again).
    """
    waiting_said = False
    watched = _LockWatch()
    while True:
        blob = get_blob(storage, spec.name, keys.TEACHER_BLOB)
        if blob is not None:
            _wait_for(lambda: keys.TEACHER in study.user_attrs, "the teacher's accuracy record")
            try:
                teacher = load_state_bytes(model, blob)
            except Exception as exc:  # a blob that is not this model's state_dict
                raise SpecError("teacher", f"the stored teacher of study {spec.name}",
                                "the teacher's weights as slimtune stored them (a state_dict of this model)",
                                f"cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
            check_finite_weights(teacher, f"the stored teacher of study {spec.name}")
            return teacher
        token = uuid.uuid4().hex
        if claim_blob(storage, spec.name, keys.TEACHER_LOCK, _lock_bytes(token)):
            try:
                def refresh() -> None:
                    touch_blob(storage, spec.name, keys.TEACHER_LOCK, _lock_bytes(token))

                with every(TEACHER_LOCK_REFRESH_S, refresh, "teacher-lock", now=False):
                    return _make_teacher(study, storage, spec, model, dm, stop, log, weights_given)
            finally:
                lock = get_blob(storage, spec.name, keys.TEACHER_LOCK)
                if lock is not None and _lock_field(lock, "token") == token:
                    drop_blob(storage, spec.name, keys.TEACHER_LOCK)
        lock = get_blob(storage, spec.name, keys.TEACHER_LOCK)
        if lock is not None and watched.abandoned(lock):
            log(f"taking over the teacher lock of {_lock_field(lock, 'host')} pid {_lock_field(lock, 'pid')}, "
                "whose process is gone")
            drop_blob(storage, spec.name, keys.TEACHER_LOCK)
            continue
        if not waiting_said:
            log("waiting for the teacher that another worker is training ...")
            waiting_said = True
        if stop.requested:
            raise Interrupted(f"interrupted by {stop.signal_name}")
        time.sleep(1.0)


def _host_id() -> str:
    """This host: its name and, where Linux tells it, its boot id (a pid means nothing after a reboot)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _lock_bytes(token: str) -> bytes:
    return json.dumps({"token": token, "time": time.time(), "host": socket.gethostname(), "host_id": _host_id(),
                       "pid": os.getpid()}).encode()


def _lock_field(lock: bytes, name: str) -> Any:
    try:
        data = json.loads(lock)
    except ValueError:
        return None
    return data.get(name) if isinstance(data, dict) else None


def _process_gone(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, but another user's
        return False
    return False


class _LockWatch:
    """Tells when a teacher lock someone else holds is abandoned (see :func:`_teacher`)."""

    def __init__(self) -> None:
        self._seen: bytes | None = None
        self._since = time.monotonic()

    def abandoned(self, lock: bytes) -> bool:
        if _lock_field(lock, "host_id") == _host_id() and _process_gone(_lock_field(lock, "pid")):
            return True
        if lock != self._seen:  # refreshed (or new): watch it afresh
            self._seen, self._since = lock, time.monotonic()
        return time.monotonic() - self._since > TEACHER_LOCK_STALE_S


def _wait_for(condition: Any, what: str, limit: float = STUDY_SETUP_WAIT_S) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise SearchFailed(f"gave up waiting {limit:.0f} s for {what}")
        time.sleep(0.2)


def _say_if_other_weights(study: optuna.Study, model: torch.nn.Module, log: Any) -> None:
    """A model object whose weights differ from the study's stored teacher: the study goes on
    with its teacher (its trials were measured against it); say so."""
    stored = (study.user_attrs.get(keys.TEACHER) or {}).get("weights_sha256")
    if stored and stored != hashlib.sha256(state_to_bytes(model)).hexdigest():
        log(f"warning: the model passed has other weights than study {study.study_name}'s teacher; the study goes "
            "on with its stored teacher (use a new study name to search from these weights)")


def _make_teacher(study: optuna.Study, storage: optuna.storages.BaseStorage, spec: StudySpec,
                  model: torch.nn.Module, dm: Any, stop: GracefulStop, log: Any,
                  weights_given: bool = False) -> torch.nn.Module:
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if weights_given:  # its own weights are the teacher: never trained again
        kind = type(model)
        source = f"given ({kind.__module__}:{kind.__qualname__}, as passed to slimtune.search)"
        extra = {"weights_sha256": hashlib.sha256(state_to_bytes(model)).hexdigest()}
    elif spec.model.checkpoint:
        model.load_state_dict(build_model(spec.model, data_info=datamodule_info(dm)).state_dict())
        source = f"checkpoint {spec.model.checkpoint}"
    else:
        log(f"training the teacher ({spec.teacher.epochs} epochs) ...")
        with stop.trial_body():
            train_teacher(model, dm, spec.teacher, spec.seed, logger=run_logger(spec.runtime, spec.name, "teacher"),
                          runtime=spec.runtime, metric=spec.metric)
        source = "trained"
    metric = spec.metric  # scores (higher is better) in the study; the metric in what is shown
    info = {
        "val_accuracy": metric.score(evaluate(model, dm.val_dataloader(), metric)),
        "test_accuracy": metric.score(evaluate(model, dm.test_dataloader(), metric)),
        "dense_bytes": dense_parameter_bytes(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - started,
        "source": source,
        **extra,
    }
    if not claim_blob(storage, spec.name, keys.TEACHER_BLOB, state_to_bytes(model)):
        # another worker published a teacher meanwhile (it took over a lock it found stale)
        _wait_for(lambda: keys.TEACHER in study.user_attrs, "the teacher's accuracy record")
        return load_state_bytes(model, get_blob(storage, spec.name, keys.TEACHER_BLOB) or b"")
    study.set_user_attr(keys.TEACHER, info)
    shown = "" if metric.name == "accuracy" else f"{metric.label} "
    log(f"teacher: {shown}val {metric.format_score(info['val_accuracy'])}, "
        f"test {metric.format_score(info['test_accuracy'])}, {info['dense_bytes']:,} bytes fp32 "
        f"({info['seconds']:.1f} s)")
    return model.eval()


def _progress(study: optuna.Study, target: int, enabled: bool) -> Any:
    from tqdm import tqdm

    bar = tqdm(total=target, initial=finished_count(study), desc=study.study_name, unit="trial",
               disable=not enabled, file=sys.stderr, dynamic_ncols=True)

    def refresh(study: optuna.Study, trial: optuna.trial.FrozenTrial | None = None) -> None:
        bar.n = min(finished_count(study), target)
        best = best_ratio_within(study, 0.01)
        bar.set_postfix_str(f"best within 1pt: {best:.1f}x" if best else "best within 1pt: -")

    return bar, refresh


def _open(spec: StudySpec, create: bool = True) -> optuna.storages.RDBStorage:
    return open_storage(spec.storage, create=create, heartbeat_interval=spec.runtime.heartbeat_interval,
                        heartbeat_grace=spec.runtime.heartbeat_grace)


def _prepare(spec: StudySpec, threads: int | None, load_checkpoint: bool = True,
             given: Given | None = None) -> tuple[Any, Any, Any]:
    """Everything that can fail on bad input, before any write; then the storage."""
    silence_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    model, dm = _check_runtime(spec, load_checkpoint, given)
    return model, dm, _open(spec)


def _write_note(storage: optuna.storages.BaseStorage, name: str, log: Any) -> None:
    """The study's note for optuna-dashboard (teacher, spec, how to read it); a failure only warns."""
    try:
        annotate_study(storage, name)
    except SpecError as exc:  # optuna-dashboard missing
        log(f"warning: no dashboard note written ({exc})")


class LiveFigures:
    """slimtune's plots on the study's optuna-dashboard page, refreshed as trials finish: at the
    start of a run, every ``every`` finished trials (counting every worker's) and at its end.
    ``seconds`` adds up the time spent refreshing. Any failure to refresh (optuna-dashboard
    missing, a busy database): one warning, then no more refreshes in this run."""

    def __init__(self, storage_url: str, every: int, log: Any) -> None:
        self.storage_url, self.every, self.log = storage_url, every, log
        self.seconds = 0.0
        self.refreshes = 0
        self._off = False

    def publish(self, study: optuna.Study) -> None:
        if self._off:
            return
        started = time.perf_counter()
        try:
            publish_figures(study, self.storage_url)
        except Exception as exc:  # optuna-dashboard missing or changed, a busy database: a view, never the search's end
            self._off = True
            self.log(f"warning: no dashboard plots written from now on ({type(exc).__name__}: {str(exc)[:200]})")
        self.seconds += time.perf_counter() - started
        self.refreshes += 1

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial | None = None) -> None:
        if self.every and trial is not None and trial.state in (TrialState.COMPLETE, TrialState.PRUNED) \
                and finished_count(study) % self.every == 0:
            self.publish(study)


def run_id() -> str:
    """A new id for a run: the trials it starts carry it (``worker`` user attr), so that its
    summary counts exactly them. Workers started by ``run_workers`` carry their parent's
    (``SLIMTUNE_RUN``)."""
    return os.environ.get(RUN_ENV) or uuid.uuid4().hex


def _ran_by(study: optuna.Study | None, run: str) -> int:
    """The trials of ``study`` this run started (finished, failed or cut short)."""
    if study is None:
        return 0
    return sum((record.worker or {}).get("run") == run for record in records(study))


def run_study(spec: StudySpec, force: bool = False, timeout: float | None = None, threads: int | None = None,
              progress: bool = True, log: Any = None, joining: bool = False,
              given: Given | None = None) -> SearchSummary:
    """Run trials in this process until ``spec``'s study holds ``spec.trials`` finished trials,
    counting those of every worker (or ``timeout`` s pass, or a signal arrives), then the
    refinement stage when ``search.refine.epochs`` is set (see ``_refine``; with a timeout, search
    and refinement then alternate until it ends). ``joining``:
    the study exists (resume, worker), so a teacher checkpoint file is not needed here. ``given``:
    the model and data module objects of ``slimtune.search``."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    model, dm, storage = _prepare(spec, threads, load_checkpoint=not joining, given=given)
    started = time.perf_counter()
    deadline = None if timeout is None else time.monotonic() + timeout
    search_deadline = deadline  # with a refinement stage, the search leaves it refine_share of the time
    if deadline is not None and spec.search.refine.epochs > 0:
        search_deadline = deadline - spec.search.refine.share * float(timeout or 0)
    run = run_id()
    study: optuna.Study | None = None
    stopped: str | None = None
    goal_text: str | None = None
    with GracefulStop() as stop:
        try:
            study = _open_study(spec, storage, force, log)
            if given is not None:
                _say_if_other_weights(study, model, log)
            teacher = _teacher(study, storage, spec, model, dm, stop, log, weights_given=given is not None)
            _write_note(storage, spec.name, log)
            teacher_val = study.user_attrs[keys.TEACHER]["val_accuracy"]
            if finished_count(study) >= spec.trials and spec.search.refine.epochs == 0:
                log(f"study {spec.name} already holds {finished_count(study)} finished trials (--trials "
                    f"{spec.trials}): nothing to run")
            context = TrialContext.create(spec, teacher, floor=teacher_val - spec.max_accuracy_drop, datamodule=dm)
            feature_kd = spec.space.knobs["feature_kd_weight"]
            if context.untappable and (feature_kd.fixed is None or feature_kd.fixed > 0):
                listed = "; ".join(f"{n}: {why}" for n, why in context.untappable.items())
                log(f"feature distillation leaves out {len(context.untappable)} layer"
                    f"{'s' * (len(context.untappable) != 1)} ({listed})")
            objective = CompressionObjective(context, storage, stop, feasible_floor=(
                None if spec.feasible_drop is None else teacher_val - spec.feasible_drop), run=run)
            bar, refresh = _progress(study, spec.trials, progress)
            figures = LiveFigures(spec.storage, spec.runtime.dashboard_every, log)
            figures.publish(study)
            goal = goal_of(spec)
            with bar:
                def calibrated_wave(study: optuna.Study, _: FrozenTrial) -> None:
                    seed_calibrated(study, storage, spec.storage, context, log)

                def search(target: int, until: float | None) -> int:
                    return run_until_target(study, storage, objective, target, stop, spec.storage, until,
                                            callbacks=[refresh, figures, calibrated_wave,
                                                       *([goal.watch(spec.storage)] if goal else [])],
                                            sampler_for=lambda number: make_sampler(spec, number))

                try:
                    if goal is not None and (reached := goal.met(study, spec.storage)):
                        raise GoalReached(reached)
                    seed_study(study, storage, spec.storage, context, stop, search_deadline, log)
                    search(spec.trials, search_deadline)
                    refine_until_deadline(study, storage, objective, spec, stop, teacher_val, search, deadline,
                                          callbacks=[refresh, figures])
                except GoalReached as exc:  # no refinement after a goal: the study is done
                    goal_text = str(exc)
                    log(goal_text)
            figures.publish(study)
        except Interrupted as exc:
            stopped = str(exc)
        if stopped is None and stop.requested:
            stopped = f"interrupted by {stop.signal_name}"
    finished = finished_count(study) if study is not None else 0
    return SearchSummary(spec.name, mask_url(spec.storage), finished, spec.trials, _ran_by(study, run),
                         time.perf_counter() - started, stopped_by=stopped, goal=goal_text)


def trusted_for_workers(spec: StudySpec) -> list[str]:
    """The modules a worker must trust to import what the user's own spec names (a worker reads
    the spec from the database, where it is data)."""
    if spec.source is not None:
        return []
    return [module_of(ref) for ref in (spec.model.factory, spec.data.module) if ref]


def worker_device(number: int, visible: str | None = None, count: int | None = None) -> dict[str, str]:
    """The environment giving local worker ``number`` its own GPU when the machine has several
    (``CUDA_VISIBLE_DEVICES``: one of those this process sees, in turn); empty otherwise.

    >>> worker_device(2, visible="0,2,5"), worker_device(0, visible=None, count=1)
    ({'CUDA_VISIBLE_DEVICES': '5'}, {})
    """
    devices = ([d for d in visible.split(",") if d.strip()] if visible is not None
               else [str(i) for i in range(torch.cuda.device_count() if count is None else count)])
    return {"CUDA_VISIBLE_DEVICES": devices[number % len(devices)].strip()} if len(devices) > 1 else {}


def run_workers(spec: StudySpec, workers: int, force: bool = False, timeout: float | None = None,
                threads: int | None = None, progress: bool = True, log: Any = None) -> SearchSummary:
    """Prepare the study and its teacher here, then run ``workers`` local worker processes
    (``slimtune worker``), each with its share of the CPU threads, until the target is met.
    ``failed_workers`` in the result counts workers that ended with an error. An in-memory
    database is refused: it lives in this process only."""
    if is_in_memory(spec.storage):
        raise SpecError("--workers", workers, "1 with an in-memory database, or a database file or server the "
                        "workers can share (e.g. --storage sqlite:///slimtune.db)",
                        f"needs a shared database, and {mask_url(spec.storage)} lives in one process's memory")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    model, dm, storage = _prepare(spec, threads)
    started = time.perf_counter()
    run = uuid.uuid4().hex
    study: optuna.Study | None = None
    with GracefulStop() as stop:
        try:
            study = _open_study(spec, storage, force, log)
            _teacher(study, storage, spec, model, dm, stop, log)
            _write_note(storage, spec.name, log)
        except Interrupted as exc:
            return SearchSummary(spec.name, mask_url(spec.storage), finished_count(study) if study else 0,
                                 spec.trials, 0, time.perf_counter() - started, stopped_by=str(exc))
    share = max(1, (threads or os.cpu_count() or 1) // workers)
    command = [sys.executable, "-m", "slimtune", "worker", "--study", spec.name, "--threads", str(share),
               "--quiet"] + (["--timeout", str(timeout)] if timeout else []) + (
                   ["--goal-drop", repr(spec.goal_drop)] if spec.goal_drop is not None else [])
    env = {**os.environ, STORAGE_ENV: spec.storage, RUN_ENV: run}  # the URL not on the command line: a password
    trusted = trusted_for_workers(spec)
    if trusted:
        env[TRUST_ENV] = ",".join(sorted(set(trusted) | set(filter(None, env.get(TRUST_ENV, "").split(",")))))
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # Own sessions: a terminal's Ctrl-C reaches only this process, which forwards it once.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        for number in range(workers):
            if not received:
                procs.append(subprocess.Popen(command, env={**env, **worker_device(number, visible)},
                                              start_new_session=True))
        bar, refresh = _progress(study, spec.trials, progress)
        with bar:
            while any(proc.poll() is None for proc in procs):
                refresh(study)
                time.sleep(1.0)
            refresh(study)
        LiveFigures(spec.storage, spec.runtime.dashboard_every, log).publish(study)  # the workers' last word
    finally:
        for proc in procs:  # only if this process is leaving abnormally
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [proc.returncode for proc in procs]
    stopped = f"interrupted by {signal.Signals(received[0]).name}" if received else None
    failed = sum(code not in (0, EXIT_INTERRUPTED) for code in codes)
    if failed:
        log(f"{failed} of {workers} workers ended with an error (exit codes {codes})")
    goal = goal_of(spec)
    return SearchSummary(spec.name, mask_url(spec.storage), finished_count(study), spec.trials, _ran_by(study, run),
                         time.perf_counter() - started, stopped_by=stopped, failed_workers=failed,
                         goal=goal.met(study, spec.storage) if goal is not None else None)


def load_stored_spec(study_name: str, storage_url: str) -> StudySpec:
    """The spec stored in an existing study; the storage URL given here replaces the stored one.

    The spec is data read from the database: the model factory and data module it names are
    imported only if trusted (``--trust`` / ``SLIMTUNE_TRUST``; see ``slimtune.spaces``)."""
    attrs = load_existing_study(study_name, storage_url).user_attrs
    if keys.SPEC not in attrs:
        raise SpecError("--study", study_name, "a study created by slimtune", "has no slimtune spec")
    source = f"the spec stored in study {study_name!r} of {mask_url(storage_url)}"
    return parse_spec(upgrade_stored_spec(attrs[keys.SPEC]), source=source).with_overrides(storage=storage_url)


def stored_fingerprint(study: optuna.Study) -> str | None:
    """The fingerprint of the spec stored in ``study``, computed by this version (a spec stored by
    an earlier one is read in this version's sections first); ``None`` for a study slimtune did
    not create."""
    raw = study.user_attrs.get(keys.SPEC)
    if not isinstance(raw, dict):
        return None
    stored = upgrade_stored_spec(raw)
    stored.setdefault("study", {})["name"] = study.study_name
    return parse_spec(stored, source=f"the spec stored in study {study.study_name!r}").fingerprint()
