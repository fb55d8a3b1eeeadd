"""Computing a study's validation metric (``[objective] metric``) on a model's outputs.

Classification metrics read logits ``(N, C)`` and integer labels; accuracy is counted exactly
(``correct / total``), the others are torchmetrics' (macro F1 and macro AUROC over the classes,
AUROC of the positive class for two classes). Regression metrics read one output per sample
(``(N,)`` or ``(N, 1)``) and numeric targets: R², MSE, MAE (torchmetrics).

Example:
    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    >>> metric_value("accuracy", logits, torch.tensor([0, 1, 1]))
    0.6666666666666666
    >>> metric_value("mse", torch.tensor([[1.0], [3.0]]), torch.tensor([1.0, 2.0]))
    0.5
"""

from __future__ import annotations

import torch
import torchmetrics.functional as tmf

from slimtune.spaces import metric


def regression_outputs(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A regression model's outputs in the targets' shape (``(N, 1)`` outputs for ``(N,)`` targets)."""
    return outputs.reshape(targets.shape)


def metric_value(name: str, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The metric ``name`` of ``outputs`` against ``targets`` (see the module docstring)."""
    outputs, targets = outputs.detach().float().cpu(), targets.detach().cpu()
    if metric(name).regression:
        predictions, targets = regression_outputs(outputs, targets), targets.float()
        if name == "r2":
            return float(tmf.r2_score(predictions.flatten(), targets.flatten()))
        if name == "mse":
            return float(tmf.mean_squared_error(predictions, targets))
        return float(tmf.mean_absolute_error(predictions, targets))
    total = int(targets.numel())
    if name == "accuracy":
        return int((outputs.argmax(1) == targets).sum()) / max(total, 1)
    classes = outputs.shape[1]
    if name == "top5_accuracy":
        top = outputs.topk(min(5, classes), dim=1).indices
        return int((top == targets[:, None]).any(dim=1).sum()) / max(total, 1)
    if name == "f1":
        return float(tmf.f1_score(outputs.argmax(1), targets, task="multiclass", num_classes=classes, average="macro"))
    probabilities = outputs.softmax(dim=1)
    if classes == 2:
        return float(tmf.auroc(probabilities[:, 1], targets, task="binary"))
    return float(tmf.auroc(probabilities, targets, task="multiclass", num_classes=classes, average="macro"))


class MetricAccumulator:
    """A metric over many batches: accuracy and top-5 accuracy as counts, MSE and MAE as sums
    (nothing kept per sample, whatever the split's size); F1, AUROC and R² keep the outputs
    (they need them all). ``value()`` equals :func:`metric_value` on the concatenated batches.

    >>> acc = MetricAccumulator("accuracy")
    >>> acc.update(torch.tensor([[2.0, 0.0]]), torch.tensor([0])); acc.update(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    >>> acc.value()
    0.5
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.total = 0.0
        self.outputs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        outputs, targets = outputs.detach().float().cpu(), targets.detach().cpu()
        if self.name == "accuracy":  # argmax, as metric_value counts it (ties: the first class)
            self.total += int((outputs.argmax(1) == targets).sum())
            self.count += int(targets.numel())
        elif self.name == "top5_accuracy":
            top = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
            self.total += int((top == targets[:, None]).any(dim=1).sum())
            self.count += int(targets.numel())
        elif self.name in ("mse", "mae"):
            error = regression_outputs(outputs, targets) - targets.float()
            self.total += float((error.pow(2) if self.name == "mse" else error.abs()).sum())
            self.count += int(targets.numel())
        else:
            self.outputs.append(outputs)
            self.targets.append(targets)

    def value(self) -> float:
        if self.name in ("mse", "mae"):
            return self.total / max(self.count, 1)
        if self.name in ("accuracy", "top5_accuracy"):
            return int(self.total) / max(self.count, 1)
        if not self.outputs:
            return 0.0
        return metric_value(self.name, torch.cat(self.outputs), torch.cat(self.targets))
