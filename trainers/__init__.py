"""Everything that touches tensors: models, data, compression, distillation, fine-tune, packing.

Example:
    >>> from slimtune.trainers import build_model, compressible_layers
    >>> from slimtune.spaces import ModelSpec
    >>> compressible_layers(build_model(ModelSpec(preset="lenet5")))
    ['conv1', 'conv2', 'fc1', 'fc2']
"""

from __future__ import annotations

from ._checks import check_finite_weights, check_model_and_data
from ._compress import BIAS_BITS, QUANTIZERS, FakeQuant, HalfPrecision, PruneMask, apply_plan, bake, channel_scales, dequantize, magnitude_mask, quantize
from ._data import DigitsDataModule, MnistDataModule, TensorDataModule, batch_loader, build_datamodule, materialize
from ._distill import feature_kd_loss, logit_kd_loss
from ._export import artifact_datamodule, check_onnx, evaluate_artifact, example_batch, export_onnx, load_artifact
from ._lightning import AccuracyFloor, ClassifierModule, DistillationModule, quiet_trainer, silence_lightning
from ._models import DigitsCNN, LeNet5, LeNet300, build_model, compressible_layers, dense_parameter_bytes, import_ref
from ._pack import layer_stats, pack_model, unpack_model
from ._lowrank import Factorized, factorize, factorized_ranks, rank_for
from ._models import TableMLP, model_from_meta
from ._data import datamodule_info
from ._table import BreastCancerDataModule, TableDataModule, read_table
from ._teacher import TeacherCache, evaluate, load_state_bytes, state_to_bytes, train_loader_for, train_teacher
from ._schedule import DynamicPruning, GradualPruning, PromotionGate, WeightAverage, cubic_sparsity
from ._importance import importance, layer_input_scales
from ._trial import PromotionRule, TrialContext, TrialResult, run_trial

__all__ = [
    "check_finite_weights", "check_model_and_data", "BIAS_BITS", "HalfPrecision", "QUANTIZERS", "DynamicPruning", "GradualPruning", "importance", "layer_input_scales", "PromotionGate", "PromotionRule", "WeightAverage", "cubic_sparsity",
    "AccuracyFloor", "ClassifierModule", "DigitsCNN", "DigitsDataModule", "DistillationModule", "FakeQuant",
    "LeNet300", "LeNet5", "MnistDataModule", "PruneMask", "TeacherCache", "TensorDataModule", "TrialContext",
    "TrialResult", "apply_plan", "artifact_datamodule", "bake", "batch_loader", "build_datamodule", "build_model",
    "channel_scales", "check_onnx", "compressible_layers", "dense_parameter_bytes", "dequantize", "evaluate",
    "evaluate_artifact", "example_batch", "export_onnx", "feature_kd_loss", "import_ref", "layer_stats",
    "load_artifact", "load_state_bytes", "logit_kd_loss", "magnitude_mask", "materialize", "pack_model", "quantize",
    "quiet_trainer", "run_trial", "silence_lightning", "state_to_bytes", "train_loader_for", "train_teacher",
    "unpack_model",
    "BreastCancerDataModule", "Factorized", "TableDataModule", "TableMLP", "datamodule_info", "factorize",
    "factorized_ranks", "model_from_meta", "rank_for", "read_table",
]
