"""Study-storage cost per trial: SQLite (WAL) vs. PostgreSQL, with 1, 2 and 4 worker processes.

Run by hand (about 2 minutes on 2 cores; needs the PostgreSQL 15 server binaries, see
``tests/postgres.py``)::

    .venv/bin/python benchmarks/storage_bench.py [--trials 50] [--workers 1,2,4] [--repeats 2]
        [--trial-seconds 0] [--reference-trial-seconds 3.5] [--backends sqlite,postgres]

Every worker is a separate process (multiprocessing, spawn) that opens the storage with
``slimtune.studies.open_storage`` (our real engine settings: SQLite WAL journal and 60 s busy
timeout, heartbeats on) and runs ``--trials`` trials on one shared two-objective study, as a
real trial does, its record written through ``slimtune.studies.TrialWriter`` as the objective
writes it: ``ask``, the worker and ``plan`` user attrs, the trial body (a sleep of
``--trial-seconds``, not counted as storage time), the result attrs (per-layer stats, timings,
...), ``tell`` with two values. The schema and the study are created once, before the
workers start, and all workers begin together; every run gets a fresh database, and the
``--repeats`` runs of each configuration are interleaved with the others' (statistics pool
their trials; throughput is the median over repeats). PostgreSQL runs with its durable
defaults (fsync on), SQLite with whatever ``open_storage`` sets. A trial's *storage seconds* are its wall time
minus the sleep; *share* is ``median storage / (median storage + trial seconds)``, with
``--reference-trial-seconds`` standing in for the trial body when ``--trial-seconds`` is 0.

Writes ``benchmarks/storage_bench.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STUDY = "storage-bench"
LAYERS = ["conv1", "conv2", "fc1", "fc2"]
DIRECTIONS = ["maximize", "minimize"]
WORKER_TIMEOUT_S = 300


# --------------------------------------------------------------------------------------------
# the per-trial workload (in the worker processes)
def _plan(rng: Any) -> dict[str, Any]:
    """A plan as ``CompressionPlan.to_dict`` writes it (every knob of every layer)."""
    from slimtune.spaces import CompressionPlan, LayerPlan

    layers = {name: LayerPlan(prune_ratio=rng.uniform(0, 0.95), weight_bits=rng.choice([2, 3, 4, 5, 6, 8, 32]),
                              kd_temperature=rng.uniform(1, 8)) for name in LAYERS}
    return CompressionPlan(layers, kd_alpha=rng.uniform(0.5, 1.0), feature_kd_weight=rng.uniform(0, 1),
                           lr=1e-3).to_dict()


def _write_results(writer: Any, rng: Any, plan: dict[str, Any]) -> None:
    """What a completed trial records after its body, through ``TrialWriter`` as the objective does
    (per-layer stats of the same names and shapes as ``layer_stats``)."""
    layers = {name: {"weights": rng.randint(1_000, 300_000), "rank": rng.randint(6, 100), "units": 1.0,
                     "sparsity": p["prune_ratio"] + rng.uniform(-1e-3, 1e-3), "bits": p["weight_bits"]}
              for name, p in plan["layers"].items()}
    seconds = {"sample": rng.uniform(0, 0.01), "compress": rng.uniform(0, 0.1), "finetune": rng.uniform(2, 4),
               "pack": rng.uniform(0, 0.2), "evaluate": rng.uniform(0, 0.3), "storage": rng.uniform(0, 0.05),
               "total": rng.uniform(3, 5)}
    writer.trained(layers=layers, val_history=[rng.uniform(0.9, 0.99) for _ in range(2)],
                   mean_bits=rng.uniform(2, 32), sparsity=rng.uniform(0, 0.95), promoted=None)
    writer.completed(test_accuracy=rng.uniform(0.9, 0.99), compression_ratio=rng.uniform(1, 60), seconds=seconds,
                     teacher_source="cache", threads=1)


def _error_text(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def worker(url: str, worker_id: int, n_trials: int, trial_seconds: float, barrier: Any, queue: Any) -> None:
    """Run ``n_trials`` trials on the shared study and put one result dict on ``queue``."""
    import random
    import warnings

    import optuna

    from slimtune.spaces import CompressionPlan  # noqa: F401 (imported here, before any trial is timed)
    from slimtune.studies import TrialWriter, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    rng = random.Random(worker_id)
    who = {"host": platform.node(), "pid": os.getpid(), "run": f"storage-bench-{worker_id}"}
    out: dict[str, Any] = {"worker": worker_id, "trials": [], "errors": []}
    try:
        storage = open_storage(url, create=False)
        study = optuna.load_study(study_name=STUDY, storage=storage, sampler=optuna.samplers.RandomSampler(worker_id))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        out["setup_error"] = _error_text(exc)
        barrier.abort()
        queue.put(out)
        return
    try:
        barrier.wait(timeout=120)
    except Exception:  # another worker could not open the study
        out["setup_error"] = "another worker failed to start"
        queue.put(out)
        return
    out["start"] = time.time()
    for _ in range(n_trials):
        t0 = time.perf_counter()
        phase = "ask"
        trial = None
        try:
            trial = study.ask()
            t_ask = time.perf_counter()
            phase = "attrs"
            plan = _plan(rng)
            writer = TrialWriter(trial)
            writer.started(who, plan)
            t_body = time.perf_counter()
            if trial_seconds > 0:
                time.sleep(trial_seconds)
            t_body_end = time.perf_counter()
            _write_results(writer, rng, plan)
            t_attrs = time.perf_counter()
            phase = "tell"
            study.tell(trial, [rng.uniform(0.9, 0.99), float(rng.randint(5_000, 300_000))])
            t_tell = time.perf_counter()
        except Exception as exc:  # a storage error: count it and go on with the next trial
            out["errors"].append(f"{phase}: {_error_text(exc)}")
            if trial is not None:
                try:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                except Exception:
                    pass
            continue
        out["trials"].append({
            "ask": t_ask - t0,
            "attrs": (t_body - t_ask) + (t_attrs - t_body_end),
            "tell": t_tell - t_attrs,
            "storage": (t_tell - t0) - (t_body_end - t_body),
        })
    out["end"] = time.time()
    storage.engine.dispose()
    queue.put(out)


# --------------------------------------------------------------------------------------------
# the parent: databases, workers, statistics
def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _prepare(url: str) -> dict[str, Any]:
    """Create the schema and the study once; return what the storage looks like."""
    import optuna
    from sqlalchemy import text

    from slimtune.studies import open_storage

    storage = open_storage(url)
    optuna.create_study(study_name=STUDY, storage=storage, directions=DIRECTIONS)
    info: dict[str, Any] = {}
    with storage.engine.connect() as conn:
        if url.startswith("sqlite"):
            info["journal_mode"] = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            info["synchronous"] = conn.exec_driver_sql("PRAGMA synchronous").scalar()
            info["busy_timeout_ms"] = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
        else:
            for name in ("server_version", "fsync", "synchronous_commit", "shared_buffers"):
                info[name] = conn.execute(text(f"SHOW {name}")).scalar()
    storage.engine.dispose()
    return info


def _check_counts(url: str) -> dict[str, int]:
    import optuna

    from slimtune.studies import open_storage

    storage = open_storage(url, read_only=True)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    storage.engine.dispose()
    return dict(counts)


def run_config(url: str, workers: int, n_trials: int, trial_seconds: float) -> dict[str, Any]:
    """One run: a fresh database at ``url``, ``workers`` processes; the raw per-trial timings."""
    info = _prepare(url)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers)
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(url, i, n_trials, trial_seconds, barrier, queue), daemon=True)
             for i in range(workers)]
    for proc in procs:
        proc.start()
    outs: list[dict[str, Any]] = []
    deadline = time.monotonic() + WORKER_TIMEOUT_S + n_trials * trial_seconds
    while len(outs) < workers and time.monotonic() < deadline:
        try:
            outs.append(queue.get(timeout=1))
        except Exception:
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():  # a stuck worker: ours, stop it by its own handle
            proc.terminate()
            proc.join(timeout=5)
    errors = Counter(e for o in outs for e in o["errors"])
    errors.update(f"setup: {o['setup_error']}" for o in outs if "setup_error" in o)
    if workers > len(outs):
        errors[f"worker lost (no result from {workers - len(outs)} worker(s))"] += workers - len(outs)
    starts = [o["start"] for o in outs if "start" in o]
    ends = [o["end"] for o in outs if "end" in o]
    trials = [t for o in outs for t in o["trials"]]
    wall = (max(ends) - min(starts)) if starts and ends else float("nan")
    return {"storage": info, "trials": trials, "errors": errors, "wall_s": wall,
            "throughput": len(trials) / wall if starts and ends and wall > 0 else float("nan"),
            "states_in_db": _check_counts(url)}


def summarize(backend: str, workers: int, n_trials: int, trial_seconds: float, reference_seconds: float,
              runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics over the pooled trials of all repeats of one (backend, workers) configuration."""
    trials = [t for run in runs for t in run["trials"]]
    errors: Counter[str] = Counter()
    for run in runs:
        errors.update(run["errors"])
    storage_s = [t["storage"] for t in trials]
    nan = float("nan")

    def med(key: str) -> float:
        return statistics.median(t[key] for t in trials) if trials else nan

    median = med("storage")
    body = trial_seconds if trial_seconds > 0 else reference_seconds
    throughputs = [run["throughput"] for run in runs if run["throughput"] == run["throughput"]]
    return {
        "backend": backend, "workers": workers, "trials_per_worker": n_trials, "repeats": len(runs),
        "trial_seconds": trial_seconds, "storage": runs[0]["storage"] if runs else {},
        "trials_ok": len(trials), "errors": sum(errors.values()), "error_kinds": dict(errors),
        "states_in_db": [run["states_in_db"] for run in runs],
        "storage_s_median": median, "storage_s_p95": _percentile(storage_s, 0.95),
        "storage_s_mean": statistics.fmean(storage_s) if storage_s else nan,
        "storage_s_max": max(storage_s) if storage_s else nan,
        "storage_s_median_per_repeat": [statistics.median(t["storage"] for t in run["trials"]) if run["trials"] else nan
                                        for run in runs],
        "ask_s_median": med("ask"), "attrs_s_median": med("attrs"), "tell_s_median": med("tell"),
        "wall_s_per_repeat": [run["wall_s"] for run in runs],
        "throughput_trials_per_s": statistics.median(throughputs) if throughputs else nan,
        "throughput_per_repeat": [run["throughput"] for run in runs],
        "share_trial_seconds": body, "share": median / (median + body) if storage_s else nan,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    body = f"{rows[0]['share_trial_seconds']:g}" if rows else "?"
    lines = [f"| backend | workers | trials | errors | storage/trial median | p95 | median per repeat (ms) "
             f"| ask / attrs / tell median (ms) | throughput trials/s | share of a {body} s trial |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        per_repeat = ", ".join(f"{m * 1e3:.0f}" for m in r["storage_s_median_per_repeat"])
        lines.append(f"| {r['backend']} | {r['workers']} | {r['trials_ok']} | {r['errors']} "
                     f"| {r['storage_s_median'] * 1e3:.1f} ms | {r['storage_s_p95'] * 1e3:.1f} ms | {per_repeat} "
                     f"| {r['ask_s_median'] * 1e3:.1f} / {r['attrs_s_median'] * 1e3:.1f} / {r['tell_s_median'] * 1e3:.1f} "
                     f"| {r['throughput_trials_per_s']:.1f} | {r['share'] * 100:.2f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50, help="trials per worker")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker-process counts")
    parser.add_argument("--trial-seconds", type=float, default=0.0, help="sleep standing for the trial body")
    parser.add_argument("--reference-trial-seconds", type=float, default=3.5,
                        help="trial body used for the share when --trial-seconds is 0")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every configuration, interleaved")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("storage_bench.json"))
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")]
    backends = [b.strip() for b in args.backends.split(",")]
    sys.path.insert(0, str(ROOT))  # for tests.postgres

    import optuna
    import sqlalchemy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_before = os.getloadavg()
    base = Path(tempfile.mkdtemp(prefix="slimtune-storage-bench-"))
    pg_base = Path(tempfile.mkdtemp(prefix="slimtune-storage-bench-pg-"))  # reachable by user postgres
    cluster = None
    configs = [(b, w) for b in backends for w in worker_counts]
    unknown = set(backends) - {"sqlite", "postgres"}
    if unknown:
        raise SystemExit(f"unknown backend(s) {sorted(unknown)}: use sqlite, postgres")
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {c: [] for c in configs}
    try:
        if "postgres" in backends:
            from tests.postgres import start_cluster

            cluster = start_cluster(pg_base, durable=True)  # fsync on: a real server's cost
        for repeat in range(args.repeats):  # repeats interleaved, so background load hits all configs alike
            for backend, workers in configs:
                name = f"bench_r{repeat}_w{workers}"
                if backend == "sqlite":
                    url = f"sqlite:///{base / (name + '.db')}"
                else:
                    assert cluster is not None
                    url = cluster.create_database(name)
                started = time.perf_counter()
                run = run_config(url, workers, args.trials, args.trial_seconds)
                runs[(backend, workers)].append(run)
                storage_s = [t["storage"] for t in run["trials"]]
                print(f"repeat {repeat}  {backend:8s} {workers} worker(s): {len(storage_s)} trials, "
                      f"{sum(run['errors'].values())} errors, median "
                      f"{(statistics.median(storage_s) if storage_s else float('nan')) * 1e3:.1f} ms, "
                      f"p95 {_percentile(storage_s, 0.95) * 1e3:.1f} ms, {run['throughput']:.1f} trials/s "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
                for kind, count in run["errors"].items():
                    print(f"    {count} x {kind}", flush=True)
                if backend == "sqlite":
                    for suffix in ("", "-wal", "-shm"):
                        Path(f"{base / name}.db{suffix}").unlink(missing_ok=True)
                else:
                    assert cluster is not None
                    cluster.drop_database(name)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(pg_base, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    rows = [summarize(b, w, args.trials, args.trial_seconds, args.reference_trial_seconds, runs[(b, w)])
            for b, w in configs]

    summary = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before],
                                   "after": [round(x, 2) for x in os.getloadavg()]},
        "python": platform.python_version(), "optuna": optuna.__version__, "sqlalchemy": sqlalchemy.__version__,
        "sqlite": sqlite3.sqlite_version,
        "workload": {"trials_per_worker": args.trials, "repeats": args.repeats, "trial_seconds": args.trial_seconds,
                     "reference_trial_seconds": args.reference_trial_seconds, "layers": LAYERS,
                     "per_trial": "ask, 12 set_user_attr through slimtune.studies.TrialWriter (worker, plan + 10 "
                                  "result attrs, as search/_objective.py writes them), tell with 2 values",
                     "sampler": "RandomSampler, no parameters suggested", "opened_with": "slimtune.studies.open_storage"},
        "results": rows,
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(markdown(rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
