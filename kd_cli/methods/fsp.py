"""`method=fsp`: Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning" (CVPR 2017), as RepDistiller runs it.

The FSP ("flow of solution procedure") matrix of two layers is G_ij = mean over positions of
bottom_i * top_j (the larger map average-pooled to the smaller grid first): one (C_top x C_bottom)
matrix per sample for each pair of consecutive layers. The student learns to produce the teacher's
matrices (mean squared difference, summed over the pairs) during an initialisation phase of
`init_epochs` epochs, in which that is its only loss; then it trains on the classification loss
(and KD when kd_weight > 0), as RepDistiller does (its `init` with 30 epochs, then `-a 0`: CE alone).
The matrices compare channels one to one, so each student layer needs as many channels as the
teacher's (resnet56 -> resnet20 yes, wrn_40_2 -> wrn_40_1 no: RepDistiller's table reports 0.00 there).

Here the initialisation epochs are the first `init_epochs` of `trainer.epochs` (one schedule for the
whole run); RepDistiller runs them before its 240 epochs at a fixed rate: for its recipe add them to
the epochs and shift the milestones (trainer.epochs=270 optim.milestones=[180,210,240]).
"""

from __future__ import annotations

from typing import Any

import torch

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import full_precision, pool_to, tensor_sum
from kd_cli.registry import NonNegative, NonNegativeInt


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """(B, Cb, H, W), (B, Ct, H', W') -> (B, Ct, Cb): the mean over positions of top_j * bottom_i."""
    size = (min(bottom.shape[2], top.shape[2]), min(bottom.shape[3], top.shape[3]))
    bottom, top = full_precision(pool_to(bottom, size)).flatten(2), full_precision(pool_to(top, size)).flatten(2)
    return top @ bottom.transpose(1, 2) / bottom.shape[2]


def fsp_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Sum over consecutive layer pairs of the mean squared difference of the FSP matrices."""
    return tensor_sum(
        (fsp_matrix(s0, s1) - fsp_matrix(t0, t1)).pow(2).mean()
        for s0, s1, t0, t1 in zip(student, student[1:], teacher, teacher[1:])
    )


@register_method("fsp")
class FlowOfSolutionProcedure(FeatureDistiller):
    loss_weights = ("fsp_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        fsp_weight: NonNegative,
        init_epochs: NonNegativeInt,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        if len(self.student_layers) < 2:
            raise KdError(
                "method=fsp compares consecutive layers and needs at least 2 of each model; "
                "name them with method.student_layers / method.teacher_layers"
            )
        self.require_maps()
        mismatched = [
            f"{s} ({a[0]}) / {t} ({b[0]})"
            for s, t, a, b in zip(self.student_layers, self.teacher_layers, self.student_shapes, self.teacher_shapes)
            if a[0] != b[0]
        ]
        if mismatched:
            raise KdError(
                f"method=fsp compares channels one to one, but these student/teacher layers differ: "
                f"{', '.join(mismatched)}; pick a student of the teacher's widths (e.g. resnet20 for "
                f"resnet56) or a method with adapters (fitnet, at)"
            )
        self.fsp_weight = fsp_weight
        self.init_epochs = init_epochs if fsp_weight else 0  # a phase with its only term left out is no phase

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        if self.epoch < self.init_epochs:  # the initialisation phase: the FSP matrices are the only loss
            logits, student, _, teacher = self.features(images, self.fsp_weight)
            return logits, {"fsp": self.fsp_weight * fsp_loss(student, teacher)}
        logits, _, teacher_logits, _ = self.features(images, 0.0)  # (the teacher runs only for KD)
        return logits, self.logit_terms(logits, teacher_logits, labels)
