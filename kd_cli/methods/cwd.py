"""`method=cwd`: channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021), on the logits.

Each channel's map becomes a distribution over its pixels, softmax(map / tau); the loss is the KL from
the teacher's to the student's, summed over pixels and channels, times tau^2, divided by C * N (the
normalisation of mmrazor's `ChannelWiseDivergence`, which the authors' configs use). Defaults: tau=1,
weight 3, mmrazor's config for PSPNet-R101 -> R18 on Cityscapes. A teacher map of another size is resized
to the student's (bilinear). Every pixel takes part (the method compares activation maps, not labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.methods.seg_logits import align_to
from kd_cli.registry import NonNegative, Temperature


def cwd_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 / (C * N) * sum over channels of KL(softmax_HW(t / tau) || softmax_HW(s / tau)); maps (N, C, H, W)."""
    n, c = student_maps.shape[:2]
    log_s = F.log_softmax(student_maps.reshape(n * c, -1) / tau, dim=1)
    log_t = F.log_softmax(teacher_maps.reshape(n * c, -1) / tau, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum() * tau**2 / (c * n)


@register_method("cwd")
class CWD(Distiller):
    tasks = ("segmentation",)
    loss_weights = ("cwd_weight", "ce_weight")

    def __init__(self, student, teacher, *, tau: Temperature, cwd_weight: NonNegative, ce_weight: NonNegative):
        super().__init__(student, teacher)
        self.tau = tau
        self.cwd_weight = cwd_weight
        self.ce_weight = ce_weight

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        terms = {}
        if self.cwd_weight:
            teacher_logits = align_to(self.teacher_logits(images), logits)
            terms["cwd"] = self.cwd_weight * cwd_loss(logits.float(), teacher_logits.float(), self.tau)
        if self.ce_weight:
            terms["ce"] = self.ce_weight * self.task.loss(logits, labels)
        return logits, terms
