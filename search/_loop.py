"""The trial loop shared by every worker: claim a slot, run one trial, tell the study.

Many workers (processes, machines) share one study and stop together at its target count of
finished (COMPLETE or PRUNED) trials:

- A worker starts a trial only if ``finished + running < target``. That check and the
  ``ask`` that creates the trial run under a cross-process lock (a PostgreSQL advisory lock,
  or a lock on the SQLite file's folder), so the target is met exactly; trials that fail do not
  count and are replaced. On other databases the check is unlocked and a study may overshoot
  by fewer trials than there are workers.
- When the remaining slots are all taken by running trials, a worker waits: if one of those
  fails it takes its place. Meanwhile it fails trials whose worker stopped sending heartbeats
  (killed, machine lost); the storage re-queues those with the same parameters.
- While a trial runs, a thread records its heartbeat; a signal fails the trial at once with
  reason ``interrupted``.

Example::

    ran = run_until_target(study, storage, objective, target=40, stop=GracefulStop(), url=url)
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import text

from slimtune.studies import STORAGE_ERRORS, TrialRecord, TrialWriter, engine_of, sqlite_lock

from ._objective import TrialFailed, describe_failure
from ._signals import GracefulStop, Interrupted, SearchFailed

WAIT_POLL_S = 1.0
MAX_FAILURES_IN_A_ROW = 5

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@contextmanager
def slot_lock(storage: optuna.storages.BaseStorage, url: str, study_name: str) -> Iterator[None]:
    """A lock held by one worker at a time, across processes and machines sharing ``url``."""
    engine = engine_of(storage)
    backend = engine.url.get_backend_name()
    if backend == "postgresql":
        key = zlib.crc32(f"slimtune:{study_name}".encode())
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()
        return
    with sqlite_lock(url):
        yield


@contextmanager
def every(seconds: float, action: Callable[[], None], name: str, now: bool = True) -> Iterator[None]:
    """Run ``action`` every ``seconds`` in a background thread while the block runs (first at
    once if ``now``). A failing call is skipped: the next one retries."""
    done = threading.Event()

    def loop() -> None:
        if not now and done.wait(seconds):
            return
        while True:
            try:
                action()
            except Exception:
                pass
            if done.wait(seconds):
                return

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every ``heartbeat_interval`` seconds while the block runs
    (a missed beat is retried; the grace period covers a few)."""
    interval = storage.get_heartbeat_interval() if isinstance(storage, optuna.storages.RDBStorage) else None
    if not interval:
        yield
        return
    with every(interval, lambda: storage.record_heartbeat(trial_id), f"heartbeat-{trial_id}"):
        yield


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail trials whose worker stopped sending heartbeats; the storage re-queues them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _tell(study: optuna.Study, trial: optuna.Trial, values: Any = None, state: TrialState | None = None) -> FrozenTrial:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return study.tell(trial, values, state=state, skip_if_finished=True)


def run_one_trial(study: optuna.Study, storage: optuna.storages.BaseStorage,
                  objective: Callable[[optuna.Trial], Any], trial: optuna.Trial) -> FrozenTrial:
    """Run ``objective`` on an asked trial and tell the outcome (FAIL reasons are user attrs)."""
    with heartbeat(storage, trial._trial_id):
        try:
            values = objective(trial)
        except optuna.TrialPruned:
            return _tell(study, trial, state=TrialState.PRUNED)
        except TrialFailed:
            return _tell(study, trial, state=TrialState.FAIL)
        except (Interrupted, KeyboardInterrupt):
            _record_failure(trial, "interrupted")
            _tell(study, trial, state=TrialState.FAIL)
            raise
        except STORAGE_ERRORS as exc:  # the database itself failed (full, damaged, gone): stop the study
            _record_failure(trial, f"storage: {describe_failure(exc.__cause__ or exc)}")
            try:
                _tell(study, trial, state=TrialState.FAIL)
            except STORAGE_ERRORS as again:  # its heartbeat stops with this process: the next worker fails it
                print(f"slimtune: trial {trial.number} could not be marked FAIL either ({describe_failure(again)}); "
                      "the next worker or `slimtune resume` fails it once its heartbeat is older than "
                      "study.heartbeat_grace", file=sys.stderr)
            raise
        except Exception as exc:  # outside the fine-tune: sampling, a storage write, ...
            # e.g. another worker already failed this trial as stale (its heartbeats stopped
            # while this process was paused): it is being retried there, so move on.
            _record_failure(trial, describe_failure(exc))
            return _tell(study, trial, state=TrialState.FAIL)
    return _tell(study, trial, values)


def _record_failure(trial: optuna.Trial, reason: str) -> None:
    try:
        TrialWriter(trial).failed(reason)
    except Exception:  # the trial may already be finished by another worker, or the database gone
        pass


def ask_enqueued(study: optuna.Study, storage: optuna.storages.BaseStorage, params: dict[str, Any],
                 user_attrs: dict[str, Any]) -> optuna.Trial:
    """Enqueue a plan and start that very trial. ``study.ask()`` starts the oldest waiting trial,
    which may be another: a seed an earlier run left, a trial re-queued after its worker died.
    Call it under the slot lock.

    Example::

        trial = ask_enqueued(study, storage, source.params, {"refines": source.number})
    """
    study.enqueue_trial(params, user_attrs=user_attrs)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    mine = max((t for t in waiting if t.user_attrs == user_attrs and t.system_attrs.get("fixed_params") == params),
               key=lambda t: t.number)
    if not storage.set_trial_state_values(mine._trial_id, state=TrialState.RUNNING):  # as Study.ask pops one
        # taken meanwhile by a worker on a database slot_lock cannot lock: it runs this plan
        # (its attrs say what it is); this one takes what ask() gives, as before
        with warnings.catch_warnings():  # the trial loop runs the heartbeat itself
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            return study.ask()
    return optuna.Trial(study, mine._trial_id)


def run_until_target(study: optuna.Study, storage: optuna.storages.BaseStorage,
                     objective: Callable[[optuna.Trial], Any], target: int, stop: GracefulStop,
                     url: str, deadline: float | None = None,
                     callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
                     max_failures_in_a_row: int = MAX_FAILURES_IN_A_ROW,
                     sampler_for: Callable[[int], optuna.samplers.BaseSampler] | None = None) -> int:
    """Run trials until the study holds ``target`` finished ones (counting every worker's), the
    deadline passes, a signal arrives, or ``max_failures_in_a_row`` of this worker's trials fail.

    ``sampler_for(n)`` gives the sampler for the trial about to be numbered ``n``: seeding by
    trial number keeps a search reproducible, and workers that start together still differ.
    Returns the number of trials this worker ran."""
    ran = failures = 0
    last_failure = None
    while not stop.requested and failures < max_failures_in_a_row:
        if deadline is not None and time.monotonic() >= deadline:
            break
        fail_stale_trials(study)
        with slot_lock(storage, url, study.study_name):
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in FINISHED for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if finished >= target:
                break
            trial = None
            if finished + running < target:
                if sampler_for is not None:  # the next number: an enqueued trial's own, else a new one
                    study.sampler = sampler_for(next((t.number for t in trials if t.state == TrialState.WAITING),
                                                     len(trials)))
                with warnings.catch_warnings():  # we run the heartbeat ourselves (see heartbeat())
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    trial = study.ask()
        if trial is None:  # the last slots are taken; wait in case one of them fails
            time.sleep(WAIT_POLL_S)
            continue
        frozen = run_one_trial(study, storage, objective, trial)
        ran += 1
        failures = failures + 1 if frozen.state == TrialState.FAIL else 0
        last_failure = TrialRecord.of(frozen).fail_reason or last_failure
        for callback in callbacks or []:
            callback(study, frozen)
    if failures >= max_failures_in_a_row:
        raise SearchFailed(f"{max_failures_in_a_row} trials in a row failed; the last: {last_failure}")
    return ran
