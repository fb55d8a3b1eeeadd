"""The ``export`` and ``evaluate`` commands: write a trial's packed model, measure a model file.

``export`` writes exactly the artifact bytes stored for a trial, so the file's length is the
trial's recorded ``size_bytes``; ``--onnx`` adds the model as integer ONNX (its stored codes,
unit-pruned layers thinner) and ``--onnx-float`` as dequantized float ONNX, each checked in
onnxruntime against PyTorch and against the trial's recorded validation score. ``evaluate``
reads a ``.slim`` file back (weights only) and measures it on its own data. Bad input exits 2
and leaves no file behind.

Example::

    slimtune export --study lenet300-mnist --max-drop 0.01 --out lenet.slim --onnx lenet.onnx
    slimtune export --study lenet300-mnist --trial 12 --out trial12.slim
    slimtune evaluate lenet.slim --split test --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimtune.spaces import Metric, SpecError, metric_of
from slimtune.studies import (
    TrialRecord, get_blob, keys, load_existing_study, mask_url, open_storage, study_metric, within_drop,
)

from ._options import add_storage_option, add_trust_option, number_in

SPLITS = ("val", "test")


_trial_number = number_in(int, 0, math.inf, "a trial number (0, 1, 2, ...)")
_drop = number_in(float, 0, 1e12, "a drop in the study's metric, >= 0 (0.01 = 1 point of accuracy)")


def add_parser(subparsers: Any) -> None:
    """Add the ``export`` and ``evaluate`` subcommands."""
    export = subparsers.add_parser("export", help="write a trial's packed model (the bytes its size counts)")
    export.add_argument("--study", required=True)
    add_storage_option(export)
    add_trial_choice(export)
    export.add_argument("--out", required=True, help="the .slim file to write")
    export.add_argument("--onnx", metavar="PATH", help="also write the model as integer ONNX: the stored codes as "
                        "INT4/INT8 weights, unit-pruned layers thinner (checked in onnxruntime on the validation split)")
    export.add_argument("--onnx-float", metavar="PATH", help="also write the dequantized model as float ONNX (checked "
                        "the same way)")
    add_trust_option(export)
    export.set_defaults(handler=_cmd_export)

    evaluate = subparsers.add_parser("evaluate", help="the study's metric (accuracy) of a model file written by export")
    evaluate.add_argument("artifact", metavar="MODEL", help="a .slim file")
    evaluate.add_argument("--split", choices=SPLITS, default="test")
    evaluate.add_argument("--json", action="store_true", help='print {"split", "<metric>", "size_bytes"} (a logged '
                          'metric: "<split>_<name>")')
    add_trust_option(evaluate)
    evaluate.set_defaults(handler=_cmd_evaluate)


def _complete_list(study: optuna.Study) -> str:
    numbers = [str(t.number) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return ", ".join(numbers) if numbers else "(none: the study has no complete trial yet)"


def trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    """The COMPLETE trial ``number`` of ``study``; anything else is a :class:`SpecError`."""
    match = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    allowed = f"a complete trial of study {study.study_name}: {_complete_list(study)}"
    if not match:
        raise SpecError("--trial", number, allowed, "does not exist")
    trial = match[0]
    if trial.state != TrialState.COMPLETE:
        reason = TrialRecord.of(trial).reason
        raise SpecError("--trial", number, allowed,
                        f"is {trial.state.name}{f' ({reason})' if reason else ''} and has no artifact")
    return trial


def _describe(trial: FrozenTrial, metric: Metric) -> str:
    record = TrialRecord.of(trial)
    test, ratio = record.test_accuracy, record.compression_ratio
    shown = "" if metric.name == "accuracy" else f"{metric.label} "
    return (f"trial {trial.number}: {shown}val {metric.format_score(trial.values[0])}, "
            f"test {'-' if test is None else metric.format_score(test)}, {int(trial.values[1]):,} bytes, "
            f"ratio {'-' if ratio is None else f'{ratio:.1f}x'}")


def _output_path(text: str, option: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise SpecError(option, text, "a file path (not a folder)", "is a folder")
    if not path.parent.is_dir():
        raise SpecError(option, text, "a file path in an existing folder",
                        f"points into a folder that does not exist ({path.parent})")
    return path


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``, moved onto it when the block succeeds and removed otherwise,
    so ``path`` is never half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def add_trial_choice(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--trial N`` or ``--max-drop D`` (one of them, unless not ``required``), as ``export`` takes them."""
    which = parser.add_mutually_exclusive_group(required=required)
    which.add_argument("--trial", type=_trial_number, help="a complete trial, by number")
    which.add_argument("--max-drop", type=_drop, metavar="D",
                       help="the smallest Pareto-optimal trial whose val metric is within D of the teacher's")


def pick_trial(study: optuna.Study, number: int | None, max_drop: float | None) -> tuple[FrozenTrial, str]:
    """The trial ``--trial``/``--max-drop`` name, and a line that says which it is."""
    metric = study_metric(study)
    if number is not None:
        trial = trial_by_number(study, number)
        return trial, _describe(trial, metric)
    assert max_drop is not None
    trial = within_drop(study, max_drop)
    teacher_val = metric.format_score(study.user_attrs[keys.TEACHER]["val_accuracy"])
    return trial, (f"chose {_describe(trial, metric)} (the smallest Pareto-optimal trial within "
                   f"{metric.drop_text(max_drop)} of the teacher's val {teacher_val})")


def stored_artifact(storage_url: str, study: optuna.Study, trial: FrozenTrial) -> bytes:
    blob = get_blob(open_storage(storage_url, read_only=True), study.study_name, keys.artifact_blob_key(trial.number))
    if blob is None:
        raise SpecError("--trial", trial.number, f"a complete trial of study {study.study_name}: {_complete_list(study)}",
                        f"has no stored artifact in {mask_url(storage_url)}")
    if len(blob) != int(trial.values[1]):
        raise SpecError("--trial", trial.number, "a trial whose stored artifact has the size it recorded",
                        f"has a stored artifact of {len(blob):,} bytes in {mask_url(storage_url)} but recorded "
                        f"{int(trial.values[1]):,} (the database was changed after the trial)")
    return blob


def write_onnx(blob: bytes, path: Path, name: str, recorded_score: float | None, metric: Metric, *, integer: bool,
               option: str, template: Any = None, datamodule: Any = None) -> str:
    """Write the artifact's model as ONNX (integer or float; checked in onnxruntime, see
    ``slimtune.trainers.export_artifact_onnx``) and say what was written and checked."""
    from slimtune.trainers import export_artifact_onnx, silence_lightning

    silence_lightning()
    done = export_artifact_onnx(blob, path, integer=integer, recorded_score=recorded_score, name=name,
                                option=option, template=template, datamodule=datamodule)
    kind = (f"{done.integer_weights} weight tensors as integer codes" if integer else "float weights")
    if integer and done.float_weights:
        kind += f", {len(done.float_weights)} as floats ({', '.join(done.float_weights[:4])}"
        kind += ", ...)" if len(done.float_weights) > 4 else ")"
    thinned = "".join(f", {layer} {before}->{after} units" for layer, (before, after) in done.thinned.items())
    if done.quantized_inputs:
        added = (f", {len(done.outputs_for_additions)} of them giving an addition int8 outputs"
                 if done.outputs_for_additions else "")
        kind += (f", {len(done.quantized_inputs)} layers with int8 inputs ({len(done.integer_inputs)} on "
                 f"onnxruntime's integer kernels{added})")
    # a logged metric (onnxruntime runs no validation_step): its task's metric, against PyTorch's
    shown, recorded = (f"{metric.computed.label} ", "PyTorch") if metric.logged else ("", "recorded")
    agree = "within the int8 tolerance" if done.quantized_inputs else "same classes"
    return (f"{done.bytes:,} bytes, {kind}{thinned}; onnxruntime matches PyTorch on {done.batch} validation inputs "
            f"(max abs diff {done.max_diff:.2g}, {agree}) and scores val {shown}{metric.computed.format(done.val)}"
            + ("" if done.recorded is None else f" ({recorded} {metric.computed.format(done.recorded)})"))


ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


def require_onnx_extra(option: str, value: str) -> None:
    """A :class:`SpecError` naming the install command unless the onnx extra's packages import."""
    import importlib

    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SpecError(option, value, "slimtune's onnx extra: pip install 'slimtune[onnx]'",
                        f"needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed")


def _onnx_outputs(args: argparse.Namespace, out: Path) -> list[tuple[str, Path, bool]]:
    """``(option, path, integer)`` of each ONNX file asked for, checked before anything is read."""
    asked = [(option, text, integer) for option, text, integer in
             (("--onnx", args.onnx, True), ("--onnx-float", args.onnx_float, False)) if text]
    outputs: list[tuple[str, Path, bool]] = []
    for option, text, integer in asked:
        require_onnx_extra(option, text)
        path = _output_path(text, option)
        for other, earlier in [("--out", out)] + [(o, p) for o, p, _ in outputs]:
            if path.resolve() == earlier.resolve():
                raise SpecError(option, text, f"a path other than {other}", f"is the same file as {other}")
        outputs.append((option, path, integer))
    return outputs


def _cmd_export(args: argparse.Namespace) -> int:
    out = _output_path(args.out, "--out")
    onnx_outputs = _onnx_outputs(args, out)
    study = load_existing_study(args.study, args.storage)
    metric = study_metric(study)
    trial, said = pick_trial(study, args.trial, args.max_drop)
    print(said)
    blob = stored_artifact(args.storage, study, trial)
    checks: list[tuple[Path, str]] = []
    name = f"the stored artifact of trial {trial.number} of study {study.study_name}"
    try:
        with contextlib.ExitStack() as stack:
            tmp_out = stack.enter_context(_staged(out))
            for option, path, integer in onnx_outputs:
                checks.append((path, write_onnx(blob, stack.enter_context(_staged(path)), name, trial.values[0],
                                                metric, integer=integer, option=option)))
            tmp_out.write_bytes(blob)
    except OSError as exc:
        raise SpecError("--out/--onnx", str(exc.filename or out), "a writable file path",
                        f"cannot be written ({exc.strerror or exc})") from None
    print(f"wrote {out} ({len(blob):,} bytes, the trial's recorded size)")
    for path, check in checks:
        print(f"wrote {path}: {check}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from slimtune.trainers import evaluate_artifact, silence_lightning, unpack_model

    silence_lightning()
    path = Path(args.artifact)
    value = evaluate_artifact(path, args.split)
    metric = metric_of(unpack_model(path.read_bytes())[1])
    size = path.stat().st_size
    if args.json:
        key = metric.column(args.split) if metric.logged else metric.name  # a logged val_ce: test_ce on test
        print(json.dumps({"split": args.split, key: value, "size_bytes": size}))
    else:
        print(f"{path}: {args.split} {metric.label} {metric.format(value)} ({size:,} bytes)")
    return 0
