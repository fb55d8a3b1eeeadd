"""Distillation losses: zero for identical outputs, positive otherwise, T**2 scaling, shapes."""

from __future__ import annotations

import torch

from slimtune.trainers import feature_kd_loss, logit_kd_loss


def test_logit_kd_is_zero_when_student_equals_teacher() -> None:
    logits = torch.randn(16, 10)
    assert float(logit_kd_loss(logits, logits.clone(), 4.0)) == 0.0


def test_logit_kd_is_positive_and_matches_the_definition() -> None:
    torch.manual_seed(0)
    student, teacher, t = torch.randn(8, 10), torch.randn(8, 10), 3.0
    p = torch.softmax(teacher / t, 1)
    expected = (p * (torch.log(p) - torch.log_softmax(student / t, 1))).sum(1).mean() * t * t
    assert torch.allclose(logit_kd_loss(student, teacher, t), expected, atol=1e-6)
    assert float(expected) > 0


def test_feature_kd_conv_is_channelwise_over_positions() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert float(feature_kd_loss(teacher, teacher.clone(), 2.0)) == 0.0
    by_hand = logit_kd_loss(student.reshape(6, 16), teacher.reshape(6, 16), 2.0)
    assert torch.allclose(feature_kd_loss(student, teacher, 2.0), by_hand)
    # shifting one channel's map by a constant changes nothing: a distribution over positions
    shifted = teacher.clone()
    shifted[:, 1] += 5.0
    assert torch.allclose(feature_kd_loss(student, shifted, 2.0), feature_kd_loss(student, teacher, 2.0), atol=1e-5)


def test_feature_kd_linear_is_over_features() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.allclose(feature_kd_loss(student, teacher, 1.5), logit_kd_loss(student, teacher, 1.5))
    assert float(feature_kd_loss(student, student, 1.5)) == 0.0
