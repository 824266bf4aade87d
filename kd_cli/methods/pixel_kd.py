"""`method=pixel_kd`: pixel-wise distillation for segmentation (Liu et al., "Structured Knowledge
Distillation for Semantic Segmentation", CVPR 2019, its pixel-wise term; the `CriterionKD` of CIRKD,
Yang et al., CVPR 2022).

Each pixel is a classification: KL(softmax(t/T) || softmax(s/T)) over the classes, averaged over the
pixels whose label is not ignored, times T^2. (CIRKD averages over every pixel; where no pixel is
ignored the two agree.) A teacher whose logits have another size is resized to the student's
(bilinear) before the comparison.
"""

from __future__ import annotations

import torch

from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.methods.seg_logits import align_to, pixel_kd_loss, valid_pixels
from kd_cli.registry import NonNegative, Temperature

__all__ = ["PixelKD", "pixel_kd_loss"]


@register_method("pixel_kd")
class PixelKD(Distiller):
    tasks = ("segmentation",)
    loss_weights = ("kd_weight", "ce_weight")

    def __init__(self, student, teacher, *, temperature: Temperature, kd_weight: NonNegative, ce_weight: NonNegative):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        terms = {}
        if self.kd_weight:
            teacher_logits = align_to(self.teacher_logits(images), logits)
            soft = pixel_kd_loss(logits.float(), teacher_logits.float(), self.temperature, valid_pixels(labels, logits))
            terms["kd"] = self.kd_weight * soft
        if self.ce_weight:
            terms["ce"] = self.ce_weight * self.task.loss(logits, labels)
        return logits, terms
