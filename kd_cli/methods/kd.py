"""`method=kd`: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).

The soft term is KL(p_teacher^T || p_student^T) averaged over the batch and multiplied by T^2,
which keeps its gradient scale independent of the temperature (section 2 of the paper).
With `logit_standardization` both models' logits are z-scored per sample first (Sun et al., 2024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.methods.logit_utils import kd_loss
from kd_cli.registry import NonNegative, Temperature


@register_method("kd")
class KD(Distiller):
    reads_teacher_logits_only = True
    loss_weights = ("kd_weight", "ce_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        temperature: Temperature,
        kd_weight: NonNegative,
        ce_weight: NonNegative,
        logit_standardization: bool,
    ):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight
        self.logit_standardization = logit_standardization

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        terms = {}
        if self.kd_weight:  # a term whose weight is 0 is left out (and the teacher not run for it)
            teacher_logits = self.teacher_logits(images)
            soft = kd_loss(
                logits.float(),
                teacher_logits.float(),
                self.temperature,
                logit_standardization=self.logit_standardization,
            )
            terms["kd"] = self.kd_weight * soft
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(logits, labels)
        return logits, terms
