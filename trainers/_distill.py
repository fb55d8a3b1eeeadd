"""Distillation losses: logits (Hinton et al. 2015) and features (channel-wise, Shu et al. 2021).

Both are ``KL(teacher || student)`` between temperature-softened distributions, scaled by
``T**2`` so gradients keep their size across temperatures, and both are zero when the student
equals the teacher.

- Logits ``(N, classes)``: a distribution over classes per sample.
- Conv features ``(N, C, H, W)``: each channel's activation map becomes a distribution over
  the ``H*W`` positions; the loss is averaged over the ``N*C`` maps.
- Linear features ``(N, F)``: the feature vector becomes a distribution over its ``F`` features.

Example:
    >>> import torch
    >>> x = torch.randn(4, 10)
    >>> float(logit_kd_loss(x, x, 4.0))
    0.0
    >>> float(feature_kd_loss(torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5), 1.0)) > 0
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher/T) || softmax(student/T)) * T**2."""
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum") / student.shape[0]
    return kl * temperature * temperature


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss on logits ``(N, classes)``."""
    return _kl_rows(student_logits, teacher_logits.to(student_logits.dtype), temperature)


def feature_kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Feature distillation of one layer's output: channel-wise for conv maps, over features for vectors."""
    teacher = teacher.to(student.dtype)
    if student.dim() > 2:  # (N, C, *spatial): one distribution per channel over positions
        n, c = student.shape[:2]
        return _kl_rows(student.reshape(n * c, -1), teacher.reshape(n * c, -1), temperature)
    return _kl_rows(student, teacher, temperature)
