"""Names under which slimtune keeps its data in an Optuna study (one place, used everywhere).

Study user attrs: ``SPEC`` (the normalized spec), ``FINGERPRINT``, ``TEACHER`` (teacher
accuracies and sizes). Trial user attrs: the ``TRIAL_*`` names, written and read only by
``_record`` (a trial's record). Blobs: ``TEACHER_BLOB``, ``SENSITIVITY_BLOB``, ``CALIBRATION_BLOB`` and
:func:`artifact_blob_key`.

Example:
    >>> artifact_blob_key(7)
    'trial/7/artifact'
"""

from __future__ import annotations

SPEC = "slimtune:spec"
FINGERPRINT = "slimtune:fingerprint"
TEACHER = "slimtune:teacher"
VERSION = "slimtune:version"
METRIC_NAMES = ["val_accuracy", "size_bytes"]
DIRECTIONS = ["maximize", "minimize"]  # a study with [objective] deploy has a third, minimized, named by it

TRIAL_PLAN = "plan"
TRIAL_LAYERS = "layers"
TRIAL_TEST_ACCURACY = "test_accuracy"
TRIAL_RATIO = "compression_ratio"
TRIAL_MEAN_BITS = "mean_bits"
TRIAL_SPARSITY = "sparsity"
TRIAL_SECONDS = "seconds"
TRIAL_VAL_HISTORY = "val_history"
TRIAL_STOP_REASON = "stop_reason"
TRIAL_FAIL_REASON = "fail_reason"
TRIAL_PROMOTED = "promoted"
TRIAL_TEACHER_SOURCE = "teacher_outputs"  # "cache" or "live": where the distillation targets came from
TRIAL_THREADS = "torch_threads"
TRIAL_WORKER = "worker"  # {"host", "pid", "run"}: who ran the trial (a run counts its own trials by "run")
TRIAL_REFINES = "refines"  # on a refinement trial: the number of the trial whose plan it trains again
TRIAL_SEEDED = "seeded"  # on a seeded plan (search.seed): "sensitivity" (allocated), "uniform" or "calibrated"
TRIAL_DEPLOY = "deploy"  # with [objective] deploy: {"onnx_bytes", "latency_ms", "batch"} of the trial's integer ONNX

TEACHER_BLOB = "teacher"
TEACHER_LOCK = "teacher.lock"
SENSITIVITY_BLOB = "sensitivity"  # the study's sensitivity pass (JSON), written once (search.seed)
CALIBRATION_BLOB = "seed.calibration"  # the calibrated wave (search.seed.calibrated): JSON, written once


def artifact_blob_key(trial_number: int) -> str:
    """Blob key of a trial's packed artifact."""
    return f"trial/{trial_number}/artifact"
