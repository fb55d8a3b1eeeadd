"""Lightning pieces: what a step is (modules) and how a run goes (a quiet trainer, callbacks).

- :class:`ClassifierModule` trains a teacher with cross-entropy.
- :class:`DistillationModule` fine-tunes a compressed student with
  ``alpha * KD(logits, T_out) + (1 - alpha) * CE + w_feat * mean_l KD(features_l, T_l)
  + w_l1 * sum_l mean|W_l| + w_l2 * sum_l mean W_l^2``; teacher outputs come from a cache
  (batches ``(index, x, y)``) or a live teacher (``(x, y)``).
- :class:`AccuracyFloor` stops a run whose validation accuracy after an epoch is below a floor.

Example:
    >>> trainer = quiet_trainer(max_epochs=1, seed=0)
    >>> trainer.logger is None and not trainer.checkpoint_callbacks
    True
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from torch import nn

from slimtune.spaces import Metric, SpecError, metric

from ._augment import ImageShift
from ._distill import feature_kd_loss, logit_kd_loss
from ._logged import LoggedValues
from ._metrics import MetricAccumulator, regression_outputs
from .methods import weight_tensors

ACCURACY = metric("accuracy")


def silence_lightning() -> None:
    """Keep Lightning's per-run banners and hints out of the search's output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*GPU available.*")
    warnings.filterwarnings("ignore", message=r".*set_metric_names is experimental.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def quiet_trainer(max_epochs: int, seed: int, callbacks: list[pl.Callback] | None = None,
                  logger: Any = None, runtime: Any = None) -> pl.Trainer:
    """A seeded one-device trainer with no checkpoints, progress bar or model summary, and no
    logger unless one is given (``run_logger``). ``runtime`` (a spec's ``[runtime]``) gives the
    ``accelerator`` and ``precision``; without it, the CPU in float32. A worker started by
    ``search --workers`` on a machine with several GPUs sees only its own (``CUDA_VISIBLE_DEVICES``)."""
    silence_lightning()
    pl.seed_everything(seed, verbose=False)
    accelerator = getattr(runtime, "accelerator", "cpu")
    precision = getattr(runtime, "precision", "32-true")
    return pl.Trainer(
        max_epochs=max_epochs, accelerator=accelerator, devices=1, precision=precision, logger=logger or False,
        enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=callbacks or [], deterministic=False,
    )


def run_logger(runtime: Any, study: str, version: str) -> Any:
    """The Lightning logger ``[runtime] logger`` asks for, writing to
    ``<log_dir>/<study>/<version>``; ``None`` for ``"none"``.

    >>> from types import SimpleNamespace
    >>> run_logger(SimpleNamespace(logger="none", log_dir="logs"), "s", "trial-0") is None
    True
    """
    if runtime.logger == "none":
        return None
    from lightning.pytorch import loggers

    if runtime.logger == "csv":
        return loggers.CSVLogger(save_dir=runtime.log_dir, name=study, version=version)
    return loggers.TensorBoardLogger(save_dir=runtime.log_dir, name=study, version=version)


def check_logger(runtime: Any) -> None:
    """A :class:`SpecError` when the logger asked for cannot run here (tensorboard not installed)."""
    if runtime.logger == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise SpecError("runtime.logger", "tensorboard", "pip install tensorboard, or logger = \"csv\"",
                            "needs the tensorboard package, which is not installed")


def runtime_device(runtime: Any) -> torch.device:
    """The device ``[runtime] accelerator`` runs on here, in the order Lightning's Trainer picks one
    (its accelerators' own availability checks): ``auto`` and ``gpu`` are an Apple-silicon GPU,
    else a CUDA GPU, else (``auto``) the CPU; a TPU host's ``auto`` gives the CPU here.

    >>> from types import SimpleNamespace
    >>> runtime_device(SimpleNamespace(accelerator="cpu"))
    device(type='cpu')
    """
    accelerator = runtime.accelerator
    if accelerator == "mps" or (accelerator in ("auto", "gpu") and MPSAccelerator.is_available()):
        return torch.device("mps")
    if accelerator == "gpu" or (accelerator == "auto" and CUDAAccelerator.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def check_accelerator(runtime: Any) -> None:
    """A :class:`SpecError` when ``[runtime] accelerator`` names a device this machine lacks, or
    ``precision`` asks for 16-bit floats on the CPU (Lightning runs only bfloat16 there).

    >>> from types import SimpleNamespace
    >>> check_accelerator(SimpleNamespace(accelerator="cpu", precision="bf16-mixed")) is None
    True
    """
    accelerator = runtime.accelerator
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise SpecError("runtime.accelerator", "gpu", '"auto" or "cpu" on this machine', "finds no CUDA GPU here")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise SpecError("runtime.accelerator", "mps", '"auto" or "cpu" on this machine', "finds no Apple GPU here")
    if runtime_device(runtime).type == "cpu" and runtime.precision == "16-mixed":
        raise SpecError("runtime.precision", "16-mixed", '"32-true" or "bf16-mixed" on the CPU',
                        "needs a GPU (Lightning runs float16 mixed precision on GPUs only)")


class _MetricMixin:
    """The validation metric over an epoch, as a score (higher is better; see
    ``slimtune.spaces.Metric``): ``val_history`` holds one score per epoch. A logged metric
    (``[objective] monitor``) is read from the evaluated model's own ``validation_step``."""

    val_history: list[float]
    metric: Metric
    _accumulated: LoggedValues | MetricAccumulator

    def evaluated_model(self) -> nn.Module:
        """The model whose metric this module tracks (the teacher, or the student)."""
        raise NotImplementedError

    def on_validation_epoch_start(self) -> None:
        if self.metric.logged:
            self._accumulated = LoggedValues()
            self._accumulated.epoch_start(self.evaluated_model())  # type: ignore[arg-type]
        else:
            self._accumulated = MetricAccumulator(self.metric.name)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if isinstance(self._accumulated, LoggedValues):
            self._accumulated.step(self.evaluated_model(), batch, batch_idx)  # type: ignore[arg-type]
            return
        x, y = batch[-2], batch[-1]
        self._accumulated.update(self(x), y)  # type: ignore[operator]

    def on_validation_epoch_end(self) -> None:
        if isinstance(self._accumulated, LoggedValues):
            self._accumulated.epoch_end(self.evaluated_model())  # type: ignore[arg-type]
            value = self._accumulated.value_of(self.metric.name, self.evaluated_model())
        else:
            value = self._accumulated.value()
        self.val_history.append(self.metric.score(value))
        self.log(self.metric.column("val"), value)  # type: ignore[attr-defined]  (for a run's logger)


class ClassifierModule(_MetricMixin, pl.LightningModule):
    """Plain supervised training (the teacher): cross-entropy, or MSE for a regression
    ``metric``; ``augment_shift`` k > 0 trains on images moved by a random offset of up to k
    pixels (:class:`ImageShift`, seeded by ``augment_seed``)."""

    def __init__(self, model: nn.Module, lr: float, augment_shift: int = 0, augment_seed: int = 0,
                 metric: Metric = ACCURACY) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.metric = metric
        self.val_history = []
        self.augment = ImageShift(augment_shift, augment_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def evaluated_model(self) -> nn.Module:
        return self.model

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = supervised_loss(self.model(self.augment(x)), y, self.metric)
        if self.logger is not None:  # [runtime] logger: otherwise nothing reads it
            self.log("train_loss", loss.detach(), on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.trainer.max_epochs or 1, 1))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class FeatureTap:
    """Forward hooks keeping the outputs of named submodules during one forward pass."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.outputs[name] = layer_output(output)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def supervised_loss(outputs: torch.Tensor, targets: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Cross-entropy on logits, or MSE of one output per sample for a regression metric."""
    if metric.regression:
        return F.mse_loss(regression_outputs(outputs, targets), targets.to(outputs.dtype))
    return F.cross_entropy(outputs, targets)


def distillation_loss(outputs: torch.Tensor, teacher_outputs: torch.Tensor, temperature: float,
                      metric: Metric) -> torch.Tensor:
    """Hinton's KD loss on logits, or MSE to the teacher's outputs for a regression metric."""
    if metric.regression:
        return F.mse_loss(outputs, teacher_outputs.to(outputs.dtype))
    return logit_kd_loss(outputs, teacher_outputs, temperature)


def layer_output(output: Any) -> Any:
    """The tensor a layer's output is distilled on: the output, or the first item of a tuple
    (an attention layer's ``(values, weights)``, a recurrent layer's ``(outputs, state)``)."""
    return output[0] if isinstance(output, (tuple, list)) and output else output


@torch.no_grad()
def untappable_layers(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, str]:
    """Why each of ``names`` cannot be distilled on its output, for a forward pass on ``x``:
    the model never calls it as a module (its parent reads its weights directly, as
    ``nn.MultiheadAttention`` does with ``out_proj``), or its output is not one tensor with a
    batch dimension.

    >>> attention = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    >>> untappable_layers(attention, ["0.self_attn.out_proj", "0.linear1"], torch.zeros(2, 3, 8))
    {'0.self_attn.out_proj': 'never called as a module (its parent uses its weights directly)'}
    """
    tap = FeatureTap(model, names)
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        tap.remove()
        model.train(was_training)
    reasons = {}
    for name in names:
        output = tap.outputs.get(name)
        if name not in tap.outputs:
            reasons[name] = "never called as a module (its parent uses its weights directly)"
        elif not isinstance(output, torch.Tensor) or output.dim() < 2 or output.shape[0] != x.shape[0]:
            reasons[name] = "its output is not one tensor with a batch dimension"
    return reasons


class _Shared:
    """What a module refers to but does not own (the teacher, its output cache, the feature
    hooks): never copied, also when a callback deep-copies the module (Lightning's
    ``WeightAveraging`` keeps an averaged copy)."""

    def __init__(self, **items: Any) -> None:
        self.__dict__.update(items)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self


class DistillationModule(_MetricMixin, pl.LightningModule):
    """Knowledge-distillation fine-tune of a compressed student.

    ``feature_temperatures`` maps hidden layer names to their feature-KD temperature (empty
    turns feature KD off). ``cache`` supplies teacher outputs by sample index; otherwise
    ``teacher`` is run on every batch.

    The loss of a training step is::

        kd_alpha * KD(logits, T_out) + (1 - kd_alpha) * CE(logits, y)
          + feature_kd_weight * (1 / |H|) * sum_{h in H} KD(features_h, T_h)
          + l1_weight * sum_{l in l1_layers} mean(|W_l|) + l2_weight * sum_{l in l1_layers} mean(W_l^2)

    where ``W_l`` is layer ``l``'s weight as the forward pass uses it (after its pruning mask
    and fake quantization; the gradient passes straight through the quantizer), and for a
    low-rank factorized layer the entries of both factors together: ``mean(|W_l|) =
    (sum |W_l0| + sum |W_l1|) / (numel(W_l0) + numel(W_l1))``. ``l1_weight = 0`` and
    ``l2_weight = 0`` (the defaults) leave the terms out. :meth:`l1_penalty` is
    ``sum_l mean(|W_l|)``, :meth:`l2_penalty` ``sum_l mean(W_l^2)``.

    ``augment_shift`` k > 0 moves each training image of the student's batch by a random
    offset of up to k pixels (:class:`ImageShift`, seeded by ``augment_seed``); the labels and
    the teacher's logits stay those of the original image, and the feature term is left out
    (the teacher's hidden outputs describe the unshifted image).
    """

    def __init__(self, student: nn.Module, *, lr: float, kd_alpha: float, logit_temperature: float,
                 feature_kd_weight: float, feature_temperatures: dict[str, float],
                 teacher: nn.Module | None = None, cache: Any = None, l1_weight: float = 0.0,
                 l1_layers: list[str] | None = None, augment_shift: int = 0, augment_seed: int = 0,
                 l2_weight: float = 0.0, metric: Metric = ACCURACY) -> None:
        super().__init__()
        self.metric = metric
        if teacher is None and cache is None:
            raise ValueError("DistillationModule needs a teacher or a cache of teacher outputs")
        self.student = student
        # The teacher is not a registered submodule: it is never trained, never switched to
        # train mode, its parameters stay out of the optimizer, and it is not copied with the module.
        self._shared = _Shared(teacher=teacher.eval() if teacher is not None else None, cache=cache)
        self.lr = lr
        self.kd_alpha = kd_alpha
        self.logit_temperature = logit_temperature
        self.feature_kd_weight = feature_kd_weight
        self.feature_temperatures = feature_temperatures if feature_kd_weight > 0 and augment_shift == 0 else {}
        self.augment = ImageShift(augment_shift, augment_seed)
        for name, weight in (("l1_weight", l1_weight), ("l2_weight", l2_weight)):
            if weight < 0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight
        self.l1_layers = list(l1_layers or [])
        if (l1_weight > 0 or l2_weight > 0) and not self.l1_layers:
            raise ValueError("l1_weight or l2_weight > 0 needs l1_layers (the compressible layers' names)")
        self.val_history = []
        self._shared.student_tap = FeatureTap(student, list(self.feature_temperatures))
        self._shared.teacher_tap = FeatureTap(teacher, list(self.feature_temperatures)) if teacher is not None else None

    @property
    def teacher(self) -> nn.Module | None:
        return self._shared.teacher

    @property
    def cache(self) -> Any:
        return self._shared.cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def evaluated_model(self) -> nn.Module:
        return self.student

    def _penalty(self, power: int) -> torch.Tensor:
        """``sum over l1_layers of mean |W_l| ** power`` (both factors of a factorized layer together)."""
        terms = []
        for name in self.l1_layers:
            weights = [getattr(m, n) for m, n in weight_tensors(self.student.get_submodule(name))]
            terms.append(torch.stack([w.abs().pow(power).sum() for w in weights]).sum()
                         / sum(w.numel() for w in weights))
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def l1_penalty(self) -> torch.Tensor:
        """``sum over l1_layers of mean |W_l|``."""
        return self._penalty(1)

    def l2_penalty(self) -> torch.Tensor:
        """``sum over l1_layers of mean W_l^2``."""
        return self._penalty(2)

    def on_fit_start(self) -> None:
        if self.teacher is not None:  # the shared teacher runs where the student trains
            self.teacher.to(self.device)

    def _teacher_outputs(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.cache is not None and len(batch) == 3:  # the cache stays in host memory
            logits, features = self.cache.lookup(batch[0].cpu(), list(self.feature_temperatures))
            return logits.to(self.device), {n: f.to(self.device) for n, f in features.items()}
        assert self.teacher is not None and self._shared.teacher_tap is not None
        with torch.no_grad():
            logits = self.teacher(batch[-2])
        return logits, dict(self._shared.teacher_tap.outputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[-2], batch[-1]
        teacher_logits, teacher_features = self._teacher_outputs(batch)
        logits = self.student(self.augment(x))
        loss = self.kd_alpha * distillation_loss(logits, teacher_logits, self.logit_temperature, self.metric)
        if self.kd_alpha < 1:
            loss = loss + (1 - self.kd_alpha) * supervised_loss(logits, y, self.metric)
        if self.feature_temperatures:
            feature_loss = sum(feature_kd_loss(self._shared.student_tap.outputs[n], teacher_features[n], t)
                               for n, t in self.feature_temperatures.items())
            loss = loss + self.feature_kd_weight * feature_loss / len(self.feature_temperatures)
        if self.l1_weight > 0:
            loss = loss + self.l1_weight * self.l1_penalty()
        if self.l2_weight > 0:
            loss = loss + self.l2_weight * self.l2_penalty()
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"non-finite loss ({float(loss.detach())}) at epoch {self.current_epoch}, step {batch_idx}")
        if self.logger is not None:  # [runtime] logger: otherwise nothing reads it
            self.log("train_loss", loss.detach(), on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.student.parameters(), lr=self.lr)

    def remove_taps(self) -> None:
        """Take the feature hooks off the student and the (shared) teacher; idempotent."""
        self._shared.student_tap.remove()
        if self._shared.teacher_tap is not None:
            self._shared.teacher_tap.remove()

    def teardown(self, stage: str) -> None:
        self.remove_taps()


class AccuracyFloor(pl.Callback):
    """Stop training when validation accuracy after an epoch falls below ``floor``.

    ``reason`` is set when it fires (Optuna cannot prune multi-objective studies, so this rule
    is slimtune's own: the trial is then marked PRUNED with this reason).
    """

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self.reason: str | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history = getattr(pl_module, "val_history", [])
        if history and history[-1] < self.floor:
            metric = getattr(pl_module, "metric", ACCURACY)
            value, bound = metric.value(history[-1]), metric.value(self.floor)
            self.reason = (f"val {metric.label} {value:.4f} after epoch {len(history)} is below the floor {bound:.4f} "
                           "(teacher minus max_accuracy_drop)" if metric.maximize else
                           f"val {metric.label} {value:.4f} after epoch {len(history)} is above the ceiling "
                           f"{bound:.4f} (teacher plus max_accuracy_drop)")
            trainer.should_stop = True
