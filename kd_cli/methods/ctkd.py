"""`method=ctkd`: Li et al., "Curriculum Temperature for Knowledge Distillation" (AAAI 2023), with the
global temperature module.

KD's temperature is learned adversarially: T = t_min + t_range * sigmoid(theta), theta a learnable
scalar (initialised to 1, as the authors' `Global_T`), and theta reaches the loss through a gradient
reversal layer, so the optimiser step that lowers the student's loss raises it with respect to T
(the temperature makes the task harder). The reversal's strength follows a cosine curriculum over the
first `curriculum_epochs` epochs, from 0 to `max_reversal` (the authors' `CosineDecay` from 0 to -1 over
10 loops, their sign giving the reversal), then stays there:

    lambda(epoch) = max_reversal * (1 - cos(pi * min(e, curriculum_epochs) / curriculum_epochs)) / 2,

with e the 1-based epoch (the authors count from 1). The KD term is KL(teacher^T || student^T) averaged
over the batch times T^2, as their `DistillKL` does, with the learned T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.methods.feature_utils import full_precision
from kd_cli.methods.logit_utils import kd_loss
from kd_cli.registry import NonNegative, Positive, PositiveInt, Probability


class ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by -scale backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def reversal_strength(epoch: int, curriculum_epochs: int, max_reversal: float) -> float:
    """The curriculum's lambda for the 0-based `epoch`: a cosine ramp from 0 to max_reversal."""
    e = min(epoch + 1, curriculum_epochs)
    return max_reversal * (1 - math.cos(math.pi * e / curriculum_epochs)) / 2


def learned_temperature(theta: torch.Tensor, t_min: float, t_range: float, reversal: float) -> torch.Tensor:
    return t_min + t_range * torch.sigmoid(ReverseGradient.apply(theta, reversal))


@register_method("ctkd")
class CurriculumTemperatureKD(Distiller):
    reads_teacher_logits_only = True
    loss_weights = ("kd_weight", "ce_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        kd_weight: NonNegative,
        ce_weight: NonNegative,
        t_min: Positive,
        t_range: Positive,
        curriculum_epochs: PositiveInt,
        max_reversal: Probability,
    ):
        super().__init__(student, teacher)
        self.kd_weight, self.ce_weight = kd_weight, ce_weight
        self.t_min, self.t_range = t_min, t_range
        self.curriculum_epochs, self.max_reversal = curriculum_epochs, max_reversal
        # theta of the global temperature (a parameter only when the KD term uses it: DDP)
        self.theta = nn.Parameter(torch.ones(())) if kd_weight else None

    def temperature(self) -> torch.Tensor:
        reversal = reversal_strength(self.epoch, self.curriculum_epochs, self.max_reversal)
        assert self.theta is not None  # only the KD term reads the temperature, and it has theta
        return learned_temperature(self.theta, self.t_min, self.t_range, reversal)

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        terms = {}
        if self.kd_weight:
            teacher_logits = self.teacher_logits(images)
            temperature = self.temperature()
            terms["kd"] = self.kd_weight * kd_loss(full_precision(logits), full_precision(teacher_logits), temperature)
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(logits, labels)
        return logits, terms
