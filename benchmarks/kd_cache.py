"""Distillation-cache speedup: the same trials with teacher outputs cached vs. a live teacher.

Run by hand (real MNIST, about 2 minutes on 2 cores)::

    .venv/bin/python benchmarks/kd_cache.py [--model lenet300|lenet5] [--repeats 3]

Prints the fine-tune seconds of each run and writes ``benchmarks/kd_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from slimtune.spaces import CompressionPlan, LayerPlan, parse_spec
from slimtune.trainers import TrialContext, build_datamodule, build_model, run_trial, train_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet300", choices=["lenet300", "lenet5"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-mb", type=int, default=2048, help="feature-cache budget (runtime.cache_mb)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = parse_spec({"study": {"name": "kd-cache"}, "model": {"preset": args.model}, "data": {"preset": "mnist"},
                       "teacher": {"epochs": 3}, "finetune": {"epochs": args.epochs},
                       "runtime": {"cache_mb": args.cache_mb}})
    dm = build_datamodule(spec.data)
    teacher = train_teacher(build_model(spec.model), dm, spec.teacher, seed=0)
    started = time.perf_counter()
    context = TrialContext.create(spec, teacher, datamodule=dm)
    cache_seconds = time.perf_counter() - started
    results: dict[str, dict[str, list[float]]] = {}
    for feature_kd in (0.0, 0.5):
        plan = CompressionPlan({n: LayerPlan(prune_ratio=0.8, weight_bits=4, kd_temperature=4.0)
                                for n in context.layer_names}, kd_alpha=0.9, feature_kd_weight=feature_kd, lr=1e-3)
        label = "logits+features" if feature_kd else "logits only"
        results[label] = {"cached": [], "live": []}
        for repeat in range(args.repeats):
            for mode in ("cached", "live"):
                outcome = run_trial(context, plan, seed=repeat, use_cache=mode == "cached")
                assert outcome.teacher_source == ("cache" if mode == "cached" else "live")
                results[label][mode].append(outcome.seconds["finetune"])
                print(f"{label:16s} {mode:6s} repeat {repeat}: fine-tune {outcome.seconds['finetune']:.2f} s, "
                      f"val {outcome.val_accuracy:.4f}", flush=True)
    summary = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": args.model, "finetune_epochs": args.epochs, "cache_build_seconds": cache_seconds,
        "runs": results,
        "speedup": {label: statistics.median(r["live"]) / statistics.median(r["cached"]) for label, r in results.items()},
    }
    print(f"building the cache once: {cache_seconds:.2f} s")
    for label, speedup in summary["speedup"].items():
        print(f"{label}: median fine-tune {statistics.median(results[label]['live']):.2f} s live teacher, "
              f"{statistics.median(results[label]['cached']):.2f} s cached -> {speedup:.2f}x")
    out = Path(__file__).with_name(f"kd_cache_{args.model}.json")
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
