"""The ``bench`` command: a trial's integer ONNX measured beside the study's dense fp32 teacher.

Both are exported to ONNX in a temporary folder (the trial's as ``export --onnx`` writes it,
checked the same way; the teacher's from the weights the study stores) and measured alike, each
in a fresh process (``slimtune.trainers.bench_onnx``): file bytes, median and 90th-percentile
latency per batch size, peak resident memory, and validation and test accuracy in onnxruntime;
then the ratios of the trial against the teacher, measured in this one run.

Example::

    slimtune bench --study lenet300-mnist --max-drop 0.01 --batch 1,256 --threads 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from slimtune.spaces import SpecError
from slimtune.studies import get_blob, keys, load_existing_study, open_storage, study_metric

from ._cmd_export import add_trial_choice, pick_trial, require_onnx_extra, stored_artifact, write_onnx
from ._options import add_storage_option, add_trust_option, number_in

MAX_BATCH = 65536
_batch_size = number_in(int, 1, MAX_BATCH, f"a batch size in 1..{MAX_BATCH}")
_threads = number_in(int, 1, 1024, "a number of threads, >= 1")
_runs = number_in(int, 1, 1_000_000, "a number of timed calls, >= 1")


def _batches(text: str) -> tuple[int, ...]:
    """``"1,256"`` as batch sizes (each checked)."""
    return tuple(dict.fromkeys(_batch_size(part.strip()) for part in text.split(",")))


def add_parser(subparsers: Any) -> None:
    """Add the ``bench`` subcommand."""
    bench = subparsers.add_parser("bench", help="a trial's integer ONNX beside the dense fp32 teacher: bytes, latency, "
                                  "memory, accuracy")
    bench.add_argument("--study", required=True)
    add_storage_option(bench)
    add_trial_choice(bench)
    bench.add_argument("--batch", type=_batches, default=(1, 256), metavar="B[,B...]",
                       help="batch sizes to time (default 1,256)")
    bench.add_argument("--threads", type=_threads, default=1, help="onnxruntime intra-op threads (default 1)")
    bench.add_argument("--runs", type=_runs, default=200, help="timed calls per batch size (default 200)")
    bench.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_trust_option(bench)
    bench.set_defaults(handler=_cmd_bench)


def _teacher_onnx(study: Any, storage: str, meta: dict[str, Any], example: Any, path: Path) -> None:
    """The study's stored teacher, as float ONNX at ``path`` (checked against PyTorch)."""
    from slimtune.trainers import export_onnx, load_state_bytes, model_from_meta

    blob = get_blob(open_storage(storage, read_only=True), study.study_name, keys.TEACHER_BLOB)
    if blob is None:
        raise SpecError("--study", study.study_name, "a study whose teacher is stored", "has no stored teacher")
    teacher = model_from_meta({"model": meta["model"], "data_info": meta.get("data_info")},
                              source=f"the stored spec of study {study.study_name}")
    load_state_bytes(teacher, blob)
    try:
        export_onnx(teacher, example, path)
    except ValueError as exc:
        raise SpecError("--study", study.study_name, "a teacher whose ONNX reproduces PyTorch's logits",
                        f"fails the onnxruntime check: {exc}") from None


def _row(label: str, path: Path, dm: Any, metric: Any, inputs: Any, args: argparse.Namespace) -> dict[str, Any]:
    from slimtune.trainers import OnnxModel, bench_onnx, evaluate

    model = OnnxModel(path, threads=args.threads)
    timing = bench_onnx(path, inputs, args.batch, args.threads, args.runs)
    return {"model": label, "bytes": path.stat().st_size,
            f"val_{metric.name}": evaluate(model, dm.val_dataloader(), metric.name),
            f"test_{metric.name}": evaluate(model, dm.test_dataloader(), metric.name),
            "latency_ms": {str(b): {"median": m, "p90": p} for b, (m, p) in timing.latency_ms.items()},
            "peak_rss_mib": timing.peak_rss_mib}


def _print(rows: list[dict[str, Any]], metric: Any, batches: tuple[int, ...]) -> None:
    head = f"{'model':<34} {'bytes':>11} {'val':>8} {'test':>8}"
    head += "".join(f" {f'batch {b} ms (p90)':>22}" for b in batches) + f" {'peak RSS':>10}"
    print(head)
    for row in rows:
        line = (f"{row['model']:<34} {row['bytes']:>11,} {metric.format(row[f'val_{metric.name}']):>8} "
                f"{metric.format(row[f'test_{metric.name}']):>8}")
        for b in batches:
            cell = row["latency_ms"][str(b)]
            timing = f"{cell['median']:.4f} ({cell['p90']:.4f})"
            line += f" {timing:>22}"
        print(line + f" {row['peak_rss_mib']:>7.1f} MiB")
    teacher, trial = rows
    ratios = [f"{teacher['bytes'] / trial['bytes']:.1f}x smaller"]
    ratios += [f"{teacher['latency_ms'][str(b)]['median'] / trial['latency_ms'][str(b)]['median']:.2f}x "
               f"as fast at batch {b}" for b in batches]
    print(f"{trial['model']} against the teacher, this run: {', '.join(ratios)}")


def _cmd_bench(args: argparse.Namespace) -> int:
    require_onnx_extra("bench", args.study)
    study = load_existing_study(args.study, args.storage)
    metric = study_metric(study)
    trial, said = pick_trial(study, args.trial, args.max_drop)
    print(said)
    blob = stored_artifact(args.storage, study, trial)

    import torch

    from slimtune.trainers import artifact_datamodule, example_batch, silence_lightning, unpack_model

    silence_lightning()
    name = f"the stored artifact of trial {trial.number} of study {study.study_name}"
    meta = unpack_model(blob)[1]
    dm = artifact_datamodule(meta, name)
    inputs = []
    for batch in dm.val_dataloader():
        inputs.append(batch[-2])
        if sum(len(x) for x in inputs) >= max(args.batch):
            break
    sample = torch.cat(inputs).numpy()  # the inputs' own dtype (token ids stay integers)
    with tempfile.TemporaryDirectory(prefix="slimtune-bench-") as folder:
        teacher_path, trial_path = Path(folder) / "teacher.onnx", Path(folder) / "trial.onnx"
        _teacher_onnx(study, args.storage, meta, example_batch(dm), teacher_path)
        write_onnx(blob, trial_path, name, trial.values[0], metric, integer=True, option="bench")
        rows = [_row("teacher, fp32 ONNX", teacher_path, dm, metric, sample, args),
                _row(f"trial {trial.number}, integer ONNX", trial_path, dm, metric, sample, args)]
    rows[1]["slim_bytes"] = len(blob)
    if args.json:
        print(json.dumps(rows))
    else:
        _print(rows, metric, args.batch)
        print(f"(the trial's .slim artifact: {len(blob):,} bytes; {args.threads} onnxruntime thread(s), "
              f"{args.runs} timed calls per batch size, each file in a fresh process)")
    return 0
