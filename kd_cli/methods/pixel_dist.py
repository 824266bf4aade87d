"""`method=pixel_dist`: DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022)
on a segmenter's pixels, as the authors' segmentation code applies it (DIST_KD `segmentation/losses/dist_kd.py`).

Every pixel's logits are one sample: the (B, C, H, W) maps become B*H*W rows of C classes. The inter-class
relation correlates each pixel's class probabilities (student with teacher, Pearson), the intra-class
relation each class's probabilities over all the batch's pixels; loss = beta * (1 - mean inter) + gamma *
(1 - mean intra), times T^2, plus the task loss. Every pixel takes part, labelled or not (the authors'
code: the relations are the teacher's, not the labels'). Defaults are the authors' for Cityscapes:
T = 1, beta = gamma = 1, weight 1. A teacher map of another size is resized to the student's (bilinear).
"""

from __future__ import annotations

import torch

from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.methods.dist import dist_losses
from kd_cli.methods.seg_logits import align_to
from kd_cli.registry import NonNegative, Temperature


def pixel_rows(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C): one row of class logits per pixel."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def pixel_dist_losses(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra) over the pixels of (B, C, H, W) logits, each times T^2."""
    inter, intra = dist_losses(pixel_rows(student_logits), pixel_rows(teacher_logits), temperature)
    assert inter is not None and intra is not None
    return inter, intra


@register_method("pixel_dist")
class PixelDIST(Distiller):
    tasks = ("segmentation",)
    loss_weights = ("beta", "gamma", "ce_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        temperature: Temperature,
        beta: NonNegative,
        gamma: NonNegative,
        ce_weight: NonNegative,
    ):
        super().__init__(student, teacher)
        self.temperature, self.beta, self.gamma, self.ce_weight = temperature, beta, gamma, ce_weight

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        terms = {}
        if self.beta or self.gamma:
            teacher_logits = align_to(self.teacher_logits(images), logits)
            inter, intra = pixel_dist_losses(logits.float(), teacher_logits.float(), self.temperature)
            if self.beta:
                terms["inter"] = self.beta * inter
            if self.gamma:
                terms["intra"] = self.gamma * intra
        if self.ce_weight:
            terms["ce"] = self.ce_weight * self.task.loss(logits, labels)
        return logits, terms
