"""`method=kd`: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).

The soft term is KL(p_teacher^T || p_student^T) averaged over the batch and multiplied by T^2,
which keeps its gradient scale independent of the temperature (section 2 of the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


@register_method("kd")
class KD(Distiller):
    def __init__(self, student, teacher, *, temperature: float, kd_weight: float, ce_weight: float):
        super().__init__(student, teacher)
        if temperature <= 0:
            raise KdError(f"method.temperature={temperature} must be positive")
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        teacher_logits = self.teacher_logits(images)
        terms = {"kd": self.kd_weight * kd_loss(logits.float(), teacher_logits.float(), self.temperature)}
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(logits, labels)
        return logits, terms
