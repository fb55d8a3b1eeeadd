"""What a deployed slimtune model weighs and how fast it runs, beside what a user would pick instead.

Run by hand from the repository root, after ``make test`` (or ``make demo``) once for the venv::

    .venv/bin/python benchmarks/deploy.py [--nets lenet300,lenet300-int8,lenet5,residual,...] [--trials N] [--runs 200]

Per net, one search (``slimtune search``, the preset's settings, ``lenet300-onnx`` with
``[objective] deploy = "onnx_bytes"`` added, ``lenet300-int8`` with every layer's input
quantized to int8 (``act_bits = 8``; ``lenet5-int8`` too), ``lenet300-int8-onnx`` with both, or, for the residual CNN
on digits, the default space with the architectures benchmark's budget, ``residual-int8`` with
``act_bits = 8``; ``--reuse`` measures the
studies already in ``--storage`` instead) and then, in this one run: the dense fp32 teacher
exported to ONNX; onnxruntime's ``quantize_dynamic`` of it (int8 weights, its defaults) and
``quantize_static`` (QDQ int8 weights and activations, calibrated on 512 training inputs, its
defaults), both after onnxruntime's recommended ``quant_pre_process``; torch's dynamic int8
quantization of the teacher's Linear layers (``torch.ao.quantization.quantize_dynamic``, run in
torch, its bytes a ``torch.save`` of its state); and the integer ONNX files ``slimtune export
--onnx`` writes for the trials ``--max-drop 0.001``, ``0.005`` and ``0.01`` pick (chosen on
validation). Every ONNX file is timed by ``slimtune.trainers.bench_onnx`` (a fresh process
each, one onnxruntime thread, median of ``--runs`` calls at batch 1 and 256 on real test
inputs) and scored on the test split in onnxruntime; torch's is timed in this process the same
way. The ratios against the best int8 baseline (the smallest file, the fastest at each batch)
are computed within the run. Writes ``benchmarks/deploy.json`` and replaces the ``deploy``
section of RESULTS.md (other nets' tables are kept as measured then; ``--render-only`` rewrites
the section from ``deploy.json``); the studies stay in ``benchmarks/deploy.db``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from torch import nn

from results_md import write_section
from slimtune.spaces import SpecError, trust
from slimtune.studies import TrialRecord, get_blob, keys, open_storage, within_drop
from slimtune.trainers import (
    OnnxModel, artifact_datamodule, bench_onnx, evaluate, example_batch, export_artifact_onnx, export_onnx,
    first_inputs, load_state_bytes, model_from_meta, silence_lightning, unpack_model,
)
from slimtune.trainers._onnx import CALIBRATION_INPUTS  # the export's own calibration size

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BATCHES = (1, 256)
PICKS = (0.1, 0.5, 1.0)  # accuracy points: the smallest Pareto trial within each drop (as export --max-drop picks)
RESIDUAL_SPEC = """[study]
name = "deploy-residual"
trials = {trials}
seed = 0

[model]
factory = "examples.architectures:ResidualCNN"

[data]
preset = "digits"

[teacher]
epochs = 30
lr = 2e-3
batch_size = 32

[finetune]
epochs = 3
batch_size = 32
"""
# net: (preset, trials, spec tables added to the preset's); lenet300-onnx searches the ONNX file's bytes too,
# lenet300-int8, lenet5-int8 and residual-int8 quantize every layer's input to int8 (act_bits = 8: integer kernels in
# onnxruntime), lenet300-int8-onnx also searches the ONNX file's bytes
NETS = {"lenet300": ("lenet300-mnist", 40, ""),
        "lenet300-onnx": ("lenet300-mnist", 40, '[objective]\ndeploy = "onnx_bytes"\n'),
        "lenet300-int8": ("lenet300-mnist", 40, "[space.act_bits]\nfixed = 8\n"),
        "lenet300-int8-onnx": ("lenet300-mnist", 40, '[space.act_bits]\nfixed = 8\n[objective]\ndeploy = "onnx_bytes"\n'),
        "lenet5": ("lenet5-mnist", 30, ""), "lenet5-int8": ("lenet5-mnist", 30, "[space.act_bits]\nfixed = 8\n"),
        "residual": (None, 60, ""),
        "residual-int8": (None, 60, "[space.act_bits]\nfixed = 8\n")}


def search(net: str, trials: int, storage: str, folder: Path, threads: int) -> str:
    """Run the net's search in its own process; returns the study name."""
    preset, _, extra = NETS[net]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    name = f"deploy-{net}"
    if preset is None:
        spec = folder / f"{net}.toml"
        spec.write_text(RESIDUAL_SPEC.format(trials=trials).replace('name = "deploy-residual"', f'name = "{name}"')
                        + "\n" + extra)
        argv = [str(spec)]
    elif extra:
        spec = folder / f"{net}.toml"
        spec.write_text((ROOT / "studies" / "presets" / f"{preset}.toml").read_text() + "\n" + extra)
        argv = [str(spec), "--study", name, "--trials", str(trials)]
    else:
        argv = ["--preset", preset, "--study", name, "--trials", str(trials)]
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass
    subprocess.run([sys.executable, "-m", "slimtune.search._cli", "search", *argv, "--storage", storage,
                    "--threads", str(threads), "--quiet"], check=True, cwd=ROOT, env=env)
    return name


def _torch_latency(model: nn.Module, inputs: torch.Tensor, threads: int, runs: int) -> dict[int, tuple[float, float]]:
    torch.set_num_threads(threads)
    out = {}
    with torch.inference_mode():
        for size in BATCHES:
            x = inputs[:size] if len(inputs) >= size else inputs.repeat(-(-size // len(inputs)), *[1] * (inputs.dim() - 1))[:size]
            for _ in range(10):
                model(x)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                model(x)
                times.append(1e3 * (time.perf_counter() - start))
            out[size] = (float(np.median(times)), float(np.percentile(times, 90)))
    return out


class _Calibration:
    """onnxruntime's calibration reader over a few training inputs."""

    def __init__(self, inputs: np.ndarray, name: str, batch: int = 64) -> None:
        self.batches = iter([{name: inputs[i: i + batch]} for i in range(0, len(inputs), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _onnx_row(label: str, path: Path, dm: Any, inputs: np.ndarray, runs: int) -> dict[str, Any]:
    timing = bench_onnx(path, inputs, BATCHES, 1, runs)
    return {"model": label, "bytes": path.stat().st_size, "test": evaluate(OnnxModel(path), dm.test_dataloader()),
            "latency_ms": {str(b): list(v) for b, v in timing.latency_ms.items()}, "peak_rss_mib": timing.peak_rss_mib}


def measure(net: str, name: str, storage: str, folder: Path, runs: int) -> dict[str, Any]:
    from onnxruntime.quantization import quant_pre_process, quantize_dynamic, quantize_static

    study = optuna.load_study(study_name=name, storage=storage)
    db = open_storage(storage, read_only=True)
    picks = {}
    for points in PICKS:
        try:
            picks[points] = within_drop(study, points / 100)
        except SpecError:
            picks[points] = None
    any_trial = next(t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    meta = unpack_model(get_blob(db, name, keys.artifact_blob_key(any_trial.number)))[1]
    dm = artifact_datamodule(meta)
    teacher = model_from_meta({"model": meta["model"], "data_info": meta.get("data_info")},
                              source=f"the stored spec of study {name}")
    load_state_bytes(teacher, get_blob(db, name, keys.TEACHER_BLOB))
    test_inputs = first_inputs(dm.test_dataloader(), max(BATCHES))
    feed = test_inputs.numpy()

    teacher_path = folder / f"{net}-teacher.onnx"
    export_onnx(teacher, example_batch(dm), teacher_path)
    rows = [_onnx_row("teacher, fp32 ONNX", teacher_path, dm, feed, runs)]
    prepared = folder / f"{net}-teacher-prepared.onnx"  # onnxruntime's recommended pre-processing (shapes, folding)
    quant_pre_process(str(teacher_path), str(prepared))
    dynamic = folder / f"{net}-dynamic.onnx"
    quantize_dynamic(str(prepared), str(dynamic))
    rows.append(_onnx_row("onnxruntime quantize_dynamic (int8)", dynamic, dm, feed, runs))
    static = folder / f"{net}-static.onnx"
    calibration = first_inputs(dm.train_dataloader(), CALIBRATION_INPUTS).numpy()
    quantize_static(str(prepared), str(static), _Calibration(calibration, "input"))
    rows.append(_onnx_row("onnxruntime quantize_static (int8 QDQ)", static, dm, feed, runs))

    quantized = torch.ao.quantization.quantize_dynamic(teacher, {nn.Linear}, dtype=torch.qint8).eval()
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    rows.append({"model": "torch dynamic int8 (Linear layers)", "bytes": len(buffer.getvalue()),
                 "test": evaluate(quantized, dm.test_dataloader()),
                 "latency_ms": {str(b): list(v) for b, v in _torch_latency(quantized, test_inputs, 1, runs).items()},
                 "peak_rss_mib": None})
    torch.set_num_threads(1)

    for points, trial in picks.items():
        if trial is None:
            continue
        record = TrialRecord.of(trial)
        path = folder / f"{net}-pick{points}.onnx"
        blob = get_blob(db, name, keys.artifact_blob_key(trial.number))
        done = export_artifact_onnx(blob, path, recorded_score=trial.values[0], name=f"trial {trial.number}")
        kind = "integer ONNX" + (f", int8 inputs ({len(done.integer_inputs)}/{len(done.quantized_inputs)} layers on "
                                 "integer kernels)" if done.quantized_inputs else "")
        row = _onnx_row(f"slimtune `--max-drop {points / 100:g}` (trial {trial.number}), {kind}", path, dm,
                        feed, runs)
        row.update({"slim_bytes": record.size_bytes, "val": record.val_accuracy, "pick": points,
                    "onnx_val": done.val, "onnx_max_diff": done.max_diff, "integer_inputs": done.integer_inputs})
        rows.append(row)
    baselines = rows[1:4]
    smallest = min(r["bytes"] for r in baselines)
    fastest = {b: min(r["latency_ms"][str(b)][0] for r in baselines) for b in BATCHES}
    for row in rows:
        row["bytes_vs_best_int8"] = smallest / row["bytes"]
        row["speed_vs_best_int8"] = {str(b): fastest[b] / row["latency_ms"][str(b)][0] for b in BATCHES}
    complete = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    return {"net": net, "study": name, "trials": len(study.trials), "complete": complete, "rows": rows,
            "date": time.strftime("%Y-%m-%d")}


def _merged(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's results, after those of the other nets that ``deploy.json`` holds (kept as measured then)."""
    path = HERE / "deploy.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    now = {r["net"] for r in results}
    kept = [{"date": earlier.get("date"), "command": earlier.get("command", "benchmarks/deploy.py --reuse"), **r}
            for r in earlier.get("results", []) if r["net"] not in now]
    order = list(NETS)
    return sorted(kept + results, key=lambda r: order.index(r["net"]) if r["net"] in order else len(order))


def table(result: dict[str, Any]) -> str:
    command = f" by `{result['command']}`" if result.get("command") else ""
    lines = [f"**{result['net']}** ({result['complete']} complete trials of {result['trials']}; measured "
             f"{result.get('date', '?')}{command})", "",
             "| model | file bytes | test acc. | batch 1 ms | batch 256 ms | peak RSS | smaller than best int8 | "
             "as fast as best int8 (1 / 256) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        rss = "-" if row["peak_rss_mib"] is None else f"{row['peak_rss_mib']:.0f} MiB"
        speed = row["speed_vs_best_int8"]
        lines.append(f"| {row['model']} | {row['bytes']:,} | {100 * row['test']:.2f} % | "
                     f"{row['latency_ms']['1'][0]:.4f} | {row['latency_ms']['256'][0]:.3f} | {rss} | "
                     f"{row['bytes_vs_best_int8']:.2f}× | {speed['1']:.2f}× / {speed['256']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--trials", type=int, default=None, help="every net's trial count (default: its own)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the searches")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--storage", default=f"sqlite:///{HERE / 'deploy.db'}")
    parser.add_argument("--reuse", action="store_true", help="measure the studies already in --storage")
    parser.add_argument("--no-results-md", action="store_true", help="print only: write neither deploy.json "
                        "nor RESULTS.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md's section from deploy.json")
    args = parser.parse_args()
    if args.render_only:
        saved = json.loads((HERE / "deploy.json").read_text())
        write_results(saved["results"], saved["machine"])
        return
    silence_lightning()
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer notes
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao.quantization's deprecation
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    trust(["examples"])
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.nets.split(","):
            trials = args.trials or NETS[net][1]
            name = f"deploy-{net}" if args.reuse else search(net, trials, args.storage, Path(tmp), args.threads)
            results.append(measure(net, name, args.storage, Path(tmp), args.runs))
            print(table(results[-1]), flush=True)
    if args.no_results_md:
        return
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    command = "benchmarks/deploy.py" + (f" --nets {args.nets}" if args.nets != ",".join(NETS) else "") + (
        f" --trials {args.trials}" if args.trials else "") + (" --reuse" if args.reuse else "")
    for result in results:
        result["command"] = command
    results = _merged(results)
    (HERE / "deploy.json").write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"),
                                                  "results": results}, indent=1))
    write_results(results, machine)


def write_results(results: list[dict[str, Any]], machine: str) -> None:
    """The RESULTS.md section: every net's table, in ``NETS`` order."""
    commands = sorted({r.get("command", "benchmarks/deploy.py --reuse") for r in results})
    body = (f"Commands: {', '.join(f'`.venv/bin/python {c}`' for c in commands)} (each net's table says when and "
            f"by which it was measured). Machine: {machine}. Raw: [`deploy.json`](deploy.json).\n\n"
            "All rows of a table in one run on one machine: onnxruntime on the CPU, one thread, each ONNX file timed "
            "in a fresh "
            "process (median of the timed calls at batch 1 and 256 on test inputs; peak resident memory of that "
            "process); torch's dynamic int8 timed in the benchmark's process (one torch thread), its bytes a "
            "`torch.save` of its state. The slimtune rows are the integer ONNX files `slimtune export --onnx` "
            "writes for the trials `--max-drop 0.001`, `0.005` and `0.01` pick (on validation). The last two columns are "
            "ratios against the best of the three int8 baselines in the same run (its smallest file; its fastest "
            "at each batch size).\n\n" + "\n\n".join(table(r) for r in results))
    write_section("deploy", "## Deployed models: integer ONNX beside int8 baselines (`deploy.py`)", body)


if __name__ == "__main__":
    main()
