"""One trial's tensor work: compress a copy of the teacher by a plan, distill, pack, evaluate.

:class:`TrialContext` holds what every trial of a study shares in one process (teacher, data,
teacher-output cache); :func:`run_trial` turns a plan into a :class:`TrialResult`.

Example (digits, a tiny budget)::

    ctx = TrialContext.create(spec, teacher)   # spec: a StudySpec, teacher: trained nn.Module
    result = run_trial(ctx, plan, seed=0)
    result.size_bytes == len(result.artifact)  # True: size is the artifact's byte length
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Subset

from slimtune.spaces import CompressionPlan, StudySpec, select_layers

from ._compress import apply_plan
from ._fold import add_missing_biases, fold_batchnorm, foldable_pairs
from ._data import build_datamodule, datamodule_info
from ._export import example_batch
from ._tensordata import materialize
from ._lightning import AccuracyFloor, DistillationModule, quiet_trainer, run_logger, untappable_layers
from ._models import compressible_layers, dense_parameter_bytes, model_from_meta
from ._onnx import deploy_figures
from ._pack import layer_stats, pack_model, unpack_model
from ._schedule import PromotionGate, weight_averaging
from ._teacher import TeacherCache, evaluate, train_loader_for
from .methods import FitContext, layer_input_scales, methods


@dataclass
class TrialResult:
    """What a trial measured. ``pruned_reason`` is set when the accuracy floor stopped it;
    ``promoted`` says whether the promotion gate gave it extra epochs (``None``: no gate)."""

    val_accuracy: float = float("nan")
    test_accuracy: float = float("nan")
    size_bytes: int = 0
    compression_ratio: float = float("nan")
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    val_history: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    pruned_reason: str | None = None
    artifact: bytes = b""
    teacher_source: str = ""
    promoted: bool | None = None
    deploy: dict[str, float] = field(default_factory=dict)  # [objective] deploy: onnx_bytes, latency_ms, batch

    @property
    def mean_bits(self) -> float:
        """Weight-count-weighted mean bit width over the compressible layers."""
        total = sum(s["weights"] for s in self.layers.values())
        return sum(s["bits"] * s["weights"] for s in self.layers.values()) / max(total, 1)

    @property
    def sparsity(self) -> float:
        """Share of zero weights over all compressible layers."""
        total = sum(s["weights"] for s in self.layers.values())
        return sum(s["sparsity"] * s["weights"] for s in self.layers.values()) / max(total, 1)


INPUT_SCALE_SAMPLES = 10_000  # training inputs the teacher's per-input RMS is measured on


@dataclass
class TrialContext:
    """Everything a study's trials share within one process. ``teacher`` is a copy of the
    given teacher in which the layers before a foldable batch norm (``folded``: ``{norm:
    layer}``) have a bias; ``dense_bytes`` counts the given teacher's parameters."""

    spec: StudySpec
    teacher: nn.Module
    datamodule: pl.LightningDataModule
    layer_names: list[str]
    output_layer: str
    floor: float
    dense_bytes: int
    cache: TeacherCache | None
    input_rms: dict[str, torch.Tensor] | None = None  # every layer's input RMS, when a method needs it
    untappable: dict[str, str] = field(default_factory=dict)  # layers feature KD leaves out, and why
    folded: dict[str, str] = field(default_factory=dict)  # batch norms each student folds: {norm: layer}
    inert: dict[str, set[str]] = field(default_factory=dict)  # {knob: layers where it can change nothing}
    example_input: torch.Tensor | None = None  # a few validation inputs (ranks for tracing the model)

    @property
    def feature_layers(self) -> list[str]:
        """The compressed hidden layers whose outputs feature distillation compares."""
        return [n for n in self.layer_names if n != self.output_layer and n not in self.untappable]

    @classmethod
    def create(cls, spec: StudySpec, teacher: nn.Module, floor: float = 0.0,
               datamodule: pl.LightningDataModule | None = None) -> TrialContext:
        """Build the shared state; teacher outputs are cached when the data is deterministic."""
        dm = datamodule or build_datamodule(spec.data, regression=spec.metric.regression)
        dense_bytes = dense_parameter_bytes(teacher)  # the teacher as the user has it
        teacher = copy.deepcopy(teacher).eval()
        example = example_batch(dm)[:2]  # a few inputs: which layers run, and the tensors' ranks
        folded = foldable_pairs(teacher, example)  # each trial folds them after its fine-tune
        add_missing_biases(teacher, folded)
        every_layer = compressible_layers(teacher)
        layer_names = select_layers(every_layer, spec.space, [n for n, _ in teacher.named_modules() if n])
        output_layer = every_layer[-1]  # the layer producing the logits (maybe not compressed)
        cache = None
        train_x: torch.Tensor | None = None  # the training inputs, in index order, once read
        hidden = [n for n in layer_names if n != output_layer]
        untappable = untappable_layers(teacher, hidden, example) if hidden else {}
        hidden = [n for n in hidden if n not in untappable]
        if getattr(dm, "deterministic_train", False):
            train_x, y = materialize(dm.train_dataloader().dataset)
            cache = TeacherCache.build(teacher, train_x, y, hidden, spec.runtime.cache_mb)
        input_rms = None
        if any(m.needs_input_rms(spec.method(m.name), spec.space) for m in methods()):
            if train_x is None:
                dataset = dm.train_dataloader().dataset
                train_x, _ = materialize(Subset(dataset, range(min(len(dataset), INPUT_SCALE_SAMPLES))))
            input_rms = layer_input_scales(teacher, every_layer, train_x[:INPUT_SCALE_SAMPLES], 1.0)
        inert: dict[str, set[str]] = {}
        for method in methods():
            for knob, layers in method.inert_layers(teacher, layer_names, example).items():
                inert.setdefault(knob, set()).update(layers)
        return cls(spec, teacher, dm, layer_names, output_layer, floor, dense_bytes, cache, input_rms, untappable,
                   folded, inert, example)

    def artifact_meta(self) -> dict[str, Any]:
        """What a loader needs besides weights: the model and data references from the spec, and
        the data's shapes (``data_info``) when the data module states them (tables)."""
        spec = self.spec.to_dict()
        meta: dict[str, Any] = {"model": spec["model"], "data": spec["data"]}
        if self.spec.metric.name != "accuracy":
            meta["objective"] = spec["objective"]
        info = datamodule_info(self.datamodule)
        if info:
            meta["data_info"] = info
        if self.folded:
            meta["folded_batchnorm"] = dict(self.folded)
        return meta


def _folded_copy(student: nn.Module, pairs: dict[str, str]) -> nn.Module:
    """A copy of the student as it would be packed now (its batch norms folded)."""
    if not pairs:
        return student
    folded = copy.deepcopy(student).eval()
    fold_batchnorm(folded, pairs)
    return folded


PromotionRule = Callable[[float, int], bool]
"""``rule(val_accuracy, size_bytes) -> bool``: does a trial at this point earn its extra epochs?"""


def run_trial(ctx: TrialContext, plan: CompressionPlan, seed: int, use_cache: bool = True,
              promote: PromotionRule | None = None, extra_epochs: int | None = None,
              log_version: str | None = None) -> TrialResult:
    """Compress, fine-tune with distillation, pack and evaluate one plan.

    With ``search.promote.epochs > 0`` and a ``promote`` rule, the trial trains
    ``finetune.epochs``, then asks ``promote(val_accuracy, size_bytes)`` (the size of the
    artifact it would pack now) whether to train that many more (``extra_epochs`` when
    given: a refinement trains ``search.refine.epochs`` more, with ``promote`` always true).
    ``finetune.augment_shift`` shifts the student's training images in every trial
    (``augment_in = "all"``) or in refinements only (``"refine"``: when ``extra_epochs`` is given).
    Raises ``FloatingPointError`` on a non-finite loss; returns with ``pruned_reason`` set when
    validation accuracy fell below ``ctx.floor`` after an epoch. ``log_version`` names the run
    for ``[runtime] logger`` (``trial-<number>``).
    """
    result = TrialResult()
    started = time.perf_counter()
    student = apply_plan(copy.deepcopy(ctx.teacher).train().requires_grad_(True), plan, ctx.spec.methods,
                         ctx.input_rms, ctx.output_layer, ctx.example_input)
    result.seconds["compress"] = time.perf_counter() - started

    hidden = [n for n in plan.layers if n in ctx.feature_layers]
    logit_temperature = (plan.logit_temperature if plan.logit_temperature is not None
                         else plan.layers[ctx.output_layer].kd_temperature)
    feature_temperatures = {n: plan.layers[n].kd_temperature for n in hidden}
    ft = ctx.spec.finetune
    # A refinement is the run given ``extra_epochs``; shifted images leave the feature term out.
    shift = ft.augment_shift if ft.augment_in == "all" or extra_epochs is not None else 0
    cached = use_cache and ctx.cache is not None and (
        plan.feature_kd_weight == 0 or shift > 0 or ctx.cache.has_features(hidden))
    module = DistillationModule(
        student, lr=plan.lr, kd_alpha=plan.kd_alpha, logit_temperature=logit_temperature,
        feature_kd_weight=plan.feature_kd_weight, feature_temperatures=feature_temperatures,
        teacher=None if cached else ctx.teacher, cache=ctx.cache if cached else None,
        l1_weight=plan.l1_weight, l2_weight=plan.l2_weight, l1_layers=list(plan.layers), augment_shift=shift,
        augment_seed=seed, metric=ctx.spec.metric)
    if cached:
        assert ctx.cache is not None
        train_batches = ctx.cache.loader(ft.batch_size, seed)
    else:
        train_batches = train_loader_for(ctx.datamodule, ft.batch_size, seed)
    floor = AccuracyFloor(ctx.floor)
    callbacks: list[pl.Callback] = [floor]
    if ft.weight_ema > 0:  # first: at the end, the masks below are re-chosen on the averaged weights
        callbacks.insert(0, weight_averaging(ft.weight_ema))
    for method in methods():  # mask schedules, over the base epochs' steps
        callbacks += method.callbacks(FitContext(student, ft.epochs, len(train_batches), ctx.spec.method(method.name)))
    gate = None
    extra = ctx.spec.search.promote.epochs if extra_epochs is None else extra_epochs
    if extra > 0 and promote is not None:
        meta = ctx.artifact_meta()
        gate = PromotionGate(ft.epochs, lambda: promote(module.val_history[-1], len(pack_model(
            _folded_copy(student, ctx.folded), meta))))
        callbacks.append(gate)
    logger = run_logger(ctx.spec.runtime, ctx.spec.name, log_version) if log_version else None
    trainer = quiet_trainer(ft.epochs + (extra if gate else 0), seed, callbacks=callbacks, logger=logger,
                            runtime=ctx.spec.runtime)
    result.teacher_source = "cache" if cached else "live"
    started = time.perf_counter()
    try:
        trainer.fit(module, train_dataloaders=train_batches, val_dataloaders=ctx.datamodule.val_dataloader())
    finally:  # Lightning skips teardown when fit raises: never leave hooks on the shared teacher
        module.remove_taps()
        ctx.teacher.cpu()  # where every trial's copy starts from
        student.cpu()
    result.seconds["finetune"] = time.perf_counter() - started
    result.val_history = list(module.val_history)
    result.promoted = gate.promoted if gate else None
    student.eval()
    fold_batchnorm(student, ctx.folded)  # what the artifact stores and the accuracy is measured on
    result.layers = layer_stats(student, list(plan.layers))
    if floor.reason is not None:
        result.pruned_reason = floor.reason
        return result

    started = time.perf_counter()
    result.artifact = pack_model(student, meta=ctx.artifact_meta())
    result.size_bytes = len(result.artifact)
    result.compression_ratio = ctx.dense_bytes / result.size_bytes
    result.seconds["pack"] = time.perf_counter() - started

    # Accuracy is measured on the model read back from the artifact: what a user would load.
    started = time.perf_counter()
    state, meta = unpack_model(result.artifact)
    # rebuilt from meta alone, as another process would; a model given as an object from the teacher
    template = ctx.teacher if ctx.spec.model.given is not None else None
    restored = model_from_meta(meta, source=ctx.spec.model.source, template=template)
    restored.load_state_dict(state)
    metric = ctx.spec.metric  # scores: higher is better (the metric, or minus it)
    result.val_accuracy = metric.score(evaluate(restored, ctx.datamodule.val_dataloader(), metric))
    result.test_accuracy = metric.score(evaluate(restored, ctx.datamodule.test_dataloader(), metric))
    result.seconds["evaluate"] = time.perf_counter() - started
    if ctx.spec.deploy is not None:  # the third objective: the trial's own integer ONNX, on this machine
        started = time.perf_counter()
        batch = ctx.spec.objective.latency_batch
        result.deploy = {**deploy_figures(restored.eval(), result.artifact, ctx.datamodule, batch), "batch": batch}
        result.seconds["deploy"] = time.perf_counter() - started
    return result
