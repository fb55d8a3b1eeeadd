"""The ``bench`` command: a trial's integer ONNX measured beside the study's dense fp32 teacher.

A ``.slim`` file (``slimtune bench MODEL.slim``) is measured beside the dense fp32 ONNX of its
own weights instead (a file holds no teacher: that row has the teacher's architecture and size,
not its accuracy). Both are exported to ONNX in a temporary folder (the trial's as ``export --onnx`` writes it,
checked the same way; the teacher's from the weights the study stores) and measured alike, each
in a fresh process (``slimtune.trainers.bench_onnx``): file bytes, median and 90th-percentile
latency per batch size, peak resident memory, and validation and test accuracy in onnxruntime;
then the ratios of the trial against the teacher, measured in this one run.

Example::

    slimtune bench --study lenet300-mnist --max-drop 0.01 --batch 1,256 --threads 1
    slimtune bench lenet.slim --batch 1,256
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
    bench.add_argument("artifact", nargs="?", metavar="MODEL.slim",
                       help="a file written by export (instead of --study): beside its own dense fp32 ONNX")
    bench.add_argument("--study", help="a study: one of its trials beside its stored teacher")
    add_storage_option(bench)
    add_trial_choice(bench, required=False)
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
            metric.column("val"): evaluate(model, dm.val_dataloader(), metric.name),
            metric.column("test"): evaluate(model, dm.test_dataloader(), metric.name),
            "latency_ms": {str(b): {"median": m, "p90": p} for b, (m, p) in timing.latency_ms.items()},
            "peak_rss_mib": timing.peak_rss_mib}


def _print(rows: list[dict[str, Any]], metric: Any, batches: tuple[int, ...]) -> None:
    head = f"{'model':<34} {'bytes':>11} {'val':>8} {'test':>8}"
    head += "".join(f" {f'batch {b} ms (p90)':>22}" for b in batches) + f" {'peak RSS':>10}"
    print(head)
    for row in rows:
        line = (f"{row['model']:<34} {row['bytes']:>11,} {metric.format(row[metric.column('val')]):>8} "
                f"{metric.format(row[metric.column('test')]):>8}")
        for b in batches:
            cell = row["latency_ms"][str(b)]
            timing = f"{cell['median']:.4f} ({cell['p90']:.4f})"
            line += f" {timing:>22}"
        print(line + f" {row['peak_rss_mib']:>7.1f} MiB")
    dense, trial = rows
    ratios = [f"{dense['bytes'] / trial['bytes']:.1f}x smaller"]
    ratios += [f"{dense['latency_ms'][str(b)]['median'] / trial['latency_ms'][str(b)]['median']:.2f}x "
               f"as fast at batch {b}" for b in batches]
    print(f"{trial['model']} against the {dense['model'].split(',')[0]}, this run: {', '.join(ratios)}")


def _chosen(args: argparse.Namespace) -> tuple[bytes, str, str, float | None, Any]:
    """``(artifact bytes, its name in messages, its label, recorded val score or None, study or
    None)`` of a ``.slim`` file or of the study trial ``--trial``/``--max-drop`` names."""
    if (args.artifact is None) == (args.study is None):
        raise SpecError("bench", args.artifact or args.study or "(no model)", "either a .slim file or --study with --trial or "
                        "--max-drop", "names both" if args.artifact else "names neither")
    if args.artifact is not None:
        if args.trial is not None or args.max_drop is not None:
            raise SpecError("--trial/--max-drop", args.trial if args.trial is not None else args.max_drop,
                            "a choice of trial with --study only", "was given with a .slim file")
        path = Path(args.artifact)
        if not path.is_file():
            raise SpecError("artifact", str(path), "a file written by slimtune export",
                            "is not a file" if path.exists() else "does not exist")
        return path.read_bytes(), str(path), f"{path.name}, integer ONNX", None, None
    if args.trial is None and args.max_drop is None:
        raise SpecError("--study", args.study, "--study with --trial N or --max-drop D", "names no trial")
    study = load_existing_study(args.study, args.storage)
    trial, said = pick_trial(study, args.trial, args.max_drop)
    print(said)
    return (stored_artifact(args.storage, study, trial), f"the stored artifact of trial {trial.number} of study "
            f"{study.study_name}", f"trial {trial.number}, integer ONNX", trial.values[0], study)


def _cmd_bench(args: argparse.Namespace) -> int:
    require_onnx_extra("bench", args.artifact or args.study)
    blob, name, label, recorded, study = _chosen(args)

    from slimtune.spaces import metric_of
    from slimtune.trainers import (
        artifact_datamodule, example_batch, export_artifact_onnx, first_inputs, silence_lightning, unpack_model,
    )

    silence_lightning()
    try:
        meta = unpack_model(blob)[1]
    except (ValueError, KeyError, TypeError, EOFError, OverflowError) as exc:
        raise SpecError("artifact", name, "a file written by slimtune export", f"is not readable ({exc})") from None
    metric = study_metric(study) if study is not None else metric_of(meta)
    dm = artifact_datamodule(meta, name)
    sample = first_inputs(dm.val_dataloader(), max(args.batch)).numpy()
    with tempfile.TemporaryDirectory(prefix="slimtune-bench-") as folder:
        dense_path, trial_path = Path(folder) / "dense.onnx", Path(folder) / "trial.onnx"
        if study is not None:
            _teacher_onnx(study, args.storage, meta, example_batch(dm), dense_path)
            dense_label = "teacher, fp32 ONNX"
        else:  # no teacher in a file: the same weights, dequantized and dense (the teacher's architecture and size)
            export_artifact_onnx(blob, dense_path, integer=False, name=name, option="bench")
            dense_label = "dense fp32 ONNX of the same weights"
        write_onnx(blob, trial_path, name, recorded, metric, integer=True, option="bench")
        shown = metric.computed  # onnxruntime runs no validation_step: a logged metric's task metric
        rows = [_row(dense_label, dense_path, dm, shown, sample, args),
                _row(label, trial_path, dm, shown, sample, args)]
    rows[1]["slim_bytes"] = len(blob)
    if args.json:
        print(json.dumps(rows))
    else:
        _print(rows, shown, args.batch)
        print(f"(the .slim artifact: {len(blob):,} bytes; {args.threads} onnxruntime thread(s), "
              f"{args.runs} timed calls per batch size, each file in a fresh process)")
    return 0
