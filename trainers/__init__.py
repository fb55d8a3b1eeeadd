"""Everything that touches tensors: models, data, compression methods, distillation, fine-tune, packing.

Example:
    >>> from slimtune.trainers import build_model, compressible_layers
    >>> from slimtune.spaces import ModelSpec
    >>> compressible_layers(build_model(ModelSpec(preset="lenet5")))
    ['conv1', 'conv2', 'fc1', 'fc2']
"""

from __future__ import annotations

from ._bench import OnnxTiming, bench_onnx
from ._checks import check_finite_weights, check_logged_metric, check_model_and_data
from ._compress import apply_plan, bake, method_options
from ._data import DigitsDataModule, MnistDataModule, build_datamodule, datamodule_info, prepare_datamodule
from ._distill import feature_kd_loss, logit_kd_loss
from ._export import artifact_datamodule, evaluate_artifact, example_batch, first_inputs, load_artifact
from ._lightning import (
    AccuracyFloor, ClassifierModule, DistillationModule, FeatureTap, check_accelerator, check_logger, quiet_trainer,
    run_logger, silence_lightning, untappable_layers,
)
from ._metrics import metric_value
from ._models import (
    DigitsCNN,
    LeNet5,
    LeNet300,
    TableMLP,
    build_model,
    compressible_layers,
    dense_parameter_bytes,
    first_parameter_difference,
    given_object_error,
    import_ref,
    model_from_meta,
    uncompressed_weights,
)
from ._onnx import OnnxExport, OnnxModel, check_onnx, export_artifact_onnx, export_onnx
from ._pack import StoredCodes, layer_stats, pack_model, unpack_codes, unpack_model
from ._schedule import PromotionGate, weight_averaging
from ._sensitivity import PassOutOfTime, sensitivity_pass
from ._table import BreastCancerDataModule, TableDataModule, read_table
from ._logged import LoggedValues, logged_names, logged_value
from ._teacher import TeacherCache, evaluate, load_state_bytes, state_to_bytes, train_loader_for, train_teacher
from ._tensordata import TensorDataModule, batch_loader, materialize
from ._thin import thin_units
from ._trial import PromotionRule, TrialContext, TrialResult, run_trial
from .methods import (
    ApplyContext,
    Codec,
    CompressionMethod,
    DynamicPruning,
    Factorized,
    FakeQuant,
    FitContext,
    GradualPruning,
    HalfPrecision,
    Mask,
    PruneMask,
    MODEL_OUTPUT,
    UnitGroup,
    UnitMask,
    channel_scales,
    cubic_sparsity,
    dequantize,
    factorize,
    factorized_ranks,
    importance,
    is_compressible,
    layer_input_scales,
    magnitude_mask,
    method,
    methods,
    quantize,
    rank_for,
    register_method,
    unit_groups,
    unit_keeps,
    unregister_method,
    weight_modules,
    weight_tensors,
)

__all__ = [
    "AccuracyFloor", "ApplyContext", "BreastCancerDataModule", "ClassifierModule", "Codec", "CompressionMethod",
    "DigitsCNN", "DigitsDataModule", "DistillationModule", "DynamicPruning", "Factorized", "FakeQuant",
    "FeatureTap", "FitContext", "GradualPruning", "HalfPrecision", "LeNet300", "LeNet5", "LoggedValues",
    "MODEL_OUTPUT", "Mask", "MnistDataModule", "OnnxExport", "OnnxModel", "OnnxTiming", "PassOutOfTime",
    "PromotionGate", "PromotionRule", "PruneMask", "StoredCodes", "TableDataModule", "TableMLP", "TeacherCache",
    "TensorDataModule", "TrialContext", "TrialResult", "UnitGroup", "UnitMask", "apply_plan", "artifact_datamodule",
    "bake", "batch_loader", "bench_onnx", "build_datamodule", "build_model", "channel_scales", "check_accelerator",
    "check_finite_weights", "check_logged_metric", "check_logger", "check_model_and_data", "check_onnx",
    "compressible_layers", "cubic_sparsity", "datamodule_info", "dense_parameter_bytes", "dequantize", "evaluate",
    "evaluate_artifact", "example_batch", "export_artifact_onnx", "export_onnx", "factorize", "factorized_ranks",
    "feature_kd_loss", "first_inputs", "first_parameter_difference", "given_object_error", "import_ref",
    "importance", "is_compressible", "layer_input_scales", "layer_stats", "load_artifact", "load_state_bytes",
    "logged_names", "logged_value", "logit_kd_loss", "magnitude_mask", "materialize", "method", "method_options",
    "methods", "metric_value", "model_from_meta", "pack_model", "prepare_datamodule", "quantize", "quiet_trainer",
    "rank_for", "read_table", "register_method", "run_logger", "run_trial", "sensitivity_pass", "silence_lightning",
    "state_to_bytes", "thin_units", "train_loader_for", "train_teacher", "uncompressed_weights", "unit_groups",
    "unit_keeps", "unpack_codes", "unpack_model", "unregister_method", "untappable_layers", "weight_averaging",
    "weight_modules", "weight_tensors",
]
