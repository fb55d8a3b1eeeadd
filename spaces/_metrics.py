"""The validation metrics a study can optimize (``[objective] metric``), as plain data.

A metric has a direction. Inside a study every value is a *score*, higher is better: the metric
itself when it is maximized (accuracy, F1, AUROC, R²), its negative when it is minimized (MSE,
MAE). The Pareto front, the accuracy floor, ``--max-drop`` and the samplers all work on
scores; what people read (tables, reports, plots) is the metric in its own units
(:meth:`Metric.value`). Drops are in the metric's units: 0.01 is one point of accuracy, 0.01 of
R², 0.01 of MSE. The regression metrics make the task a regression: a numeric target, a model
with one output per sample, a teacher trained with MSE, distillation by MSE to the teacher's
outputs.

Example:
    >>> mse = metric("mse")
    >>> mse.regression, mse.score(0.25), mse.value(-0.25), mse.format_score(-0.25)
    (True, -0.25, 0.25, '0.2500')
    >>> metric("accuracy").format(0.9731), metric("accuracy").drop_text(0.005), mse.drop_text(0.005)
    ('97.31%', '0.5 points', '0.005')

A value the model's own ``LightningModule`` logs in ``validation_step`` (``[objective] monitor``,
with ``mode`` as in Lightning's ``ModelCheckpoint``) can be the metric instead: its ``base`` is
the built-in metric of the same task, which says how the student distills (logits or MSE) and
what an ONNX file, which runs no ``validation_step``, is checked on.

    >>> f1 = logged_metric("val_f1", "max", metric("accuracy"))
    >>> f1.logged, f1.objective_name, f1.computed.name, f1.format(0.5), f1.column("test")
    (True, 'val_f1', 'accuracy', '0.5000', 'test_f1')
    >>> logged_metric("val_loss", "min", metric("accuracy")).objective_name
    'val_neg_loss'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    """A validation metric: its name in the spec, how people call it, its direction, whether it
    reads as a percentage, and whether it makes the task a regression."""

    name: str
    label: str
    maximize: bool = True
    percent: bool = True
    regression: bool = False
    base: str | None = None  # a logged value's: the built-in metric of its task (what ONNX checks compare)

    @property
    def logged(self) -> bool:
        """Whether the model's own ``validation_step`` logs this value (``[objective] monitor``)."""
        return self.base is not None

    @property
    def computed(self) -> Metric:
        """The built-in metric computed from outputs alone: this one, or a logged value's ``base``."""
        return METRICS[self.base] if self.base is not None else self

    def score(self, value: float) -> float:
        """The higher-is-better score of a metric value."""
        return value if self.maximize else -value

    def value(self, score: float | None) -> float | None:
        """The metric value of a score (``None`` stays ``None``)."""
        return None if score is None else (score if self.maximize else -score)

    def format(self, value: float | None) -> str:
        """A metric value as people read it: ``97.31%`` or ``0.2500``; empty for none."""
        if value is None:
            return ""
        return f"{100 * value:.2f}%" if self.percent else f"{value:.4f}"

    @property
    def objective_name(self) -> str:
        """The study's first objective as Optuna names it: ``val_accuracy``, or ``val_neg_mse``
        for a minimized metric (the score is its negative); a logged value as its column, e.g.
        ``val_f1``, or ``val_neg_loss`` for a minimized ``val_loss``."""
        if self.logged:
            column = self.column("val")
            return column if self.maximize else f"val_neg_{column[len('val_'):]}"
        return f"val_{self.name}" if self.maximize else f"val_neg_{self.name}"

    def column(self, split: str) -> str:
        """The table column of its value on ``split`` (``val``/``test``): ``val_accuracy``; a
        logged ``val_ce`` gives ``val_ce`` and ``test_ce``.

        >>> metric("mse").column("test"), logged_metric("val/ce", "min", metric("mse")).column("test")
        ('test_mse', 'test_ce')
        >>> [logged_metric(name, "min", metric("mse")).column("val") for name in ("valid_loss", "value")]
        ['val_loss', 'val_value']
        """
        stem = self.name
        if self.logged:  # a split's own prefix, followed by a separator, is dropped: val_loss -> loss
            for prefix in ("validation", "valid", "val"):
                if stem.startswith(prefix) and len(stem) > len(prefix) + 1 and stem[len(prefix)] in "_/-.":
                    stem = stem[len(prefix) + 1:]
                    break
        return f"{split}_{stem}"

    def format_score(self, score: float | None) -> str:
        """A stored score as people read the metric (``97.31%``, ``0.2500`` for an MSE of 0.25)."""
        return self.format(self.value(score))

    def drop_text(self, drop: float) -> str:
        """A drop in the metric's units, as people read it: ``0.5 points`` of a percentage, ``0.005`` else."""
        return f"{100 * drop:g} points" if self.percent else f"{drop:g}"


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", "accuracy"),
    Metric("top5_accuracy", "top-5 accuracy"),
    Metric("f1", "macro F1"),
    Metric("auroc", "macro AUROC"),
    Metric("r2", "R²", percent=False, regression=True),
    Metric("mse", "MSE", maximize=False, percent=False, regression=True),
    Metric("mae", "MAE", maximize=False, percent=False, regression=True),
)}
DEFAULT_METRIC = "accuracy"


def metric(name: str) -> Metric:
    """The metric called ``name`` (one of :data:`METRICS`)."""
    return METRICS[name]


def logged_metric(monitor: str, mode: str, base: Metric) -> Metric:
    """The value ``monitor`` that the model's ``validation_step`` logs, maximized for ``mode``
    ``"max"``, of the task of the built-in metric ``base``."""
    return Metric(monitor, monitor, maximize=mode != "min", percent=False, regression=base.regression, base=base.name)


def objective_metric(objective: Mapping[str, Any]) -> Metric:
    """The metric of a parsed ``[objective]`` table: ``monitor`` when set, else ``metric``."""
    base = METRICS[objective.get("metric", DEFAULT_METRIC)]
    monitor = objective.get("monitor") or ""
    return logged_metric(monitor, objective.get("mode", "max"), base) if monitor else base


def metric_of(spec: Mapping[str, Any] | None) -> Metric:
    """The metric of a stored spec (a study's ``slimtune:spec`` attr or an artifact's meta);
    accuracy when it names none or one this version does not know."""
    objective = (spec or {}).get("objective") or {}
    if not isinstance(objective, Mapping):
        return METRICS[DEFAULT_METRIC]
    chosen, monitor, mode = objective.get("metric"), objective.get("monitor"), objective.get("mode", "max")
    readable = isinstance(monitor, str) and monitor.strip() and monitor not in METRICS and mode in ("max", "min")
    return objective_metric({"metric": chosen if isinstance(chosen, str) and chosen in METRICS else DEFAULT_METRIC,
                             "monitor": monitor if readable else "", "mode": mode})
