"""`method=ab`: Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
Neurons" (AAAI 2019), as RepDistiller runs it (`--distill abound`; the authors' bhheo/AB_distillation).

The student learns where the teacher's neurons switch on: on the pre-ReLU features of each stage
(`PreActivationTap`), its response s (through a connector into the teacher's channels) is pushed beyond
+margin where the teacher's t is positive and below -margin where it is not, by the paper's alternative
(differentiable) L2 form of the activation-transfer loss:

    a(s, t) = sum over (c, h, w) of (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0],
              averaged over the batch
    ab = sum over the stages i = 1..n of a_i / 2^(n - i)                  (the deepest stage weighs 1)

RepDistiller's ABLoss also multiplies by 3/1000: here that factor is the weight (ab_init_weight 0.003).
Its recipe is an initialisation phase of `init_epochs` epochs in which this is the only loss, training the
student's body and the connectors (RepDistiller's `init`, 30 epochs), then classification: CE alone
(`-r 1 -a 0`; its main phase computes no AB term whatever `-b` says). `ab_weight` adds the AB term to that
phase too (0: the recipe). Connectors as RepDistiller's: none where the channel counts are equal, else a
1x1 conv + BatchNorm (the authors' connector); the larger grid is average-pooled to the smaller. The
initialisation epochs are the first `init_epochs` of `trainer.epochs` (see fsp.py for RepDistiller's recipe).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd_cli.methods import register_method
from kd_cli.methods.feature_utils import full_precision, tensor_sum
from kd_cli.methods.ofd import PreReluDistiller, connector, stage_weights
from kd_cli.registry import NonNegative, NonNegativeInt, Positive


def boundary_loss(student: torch.Tensor, teacher: torch.Tensor, margin: float) -> torch.Tensor:
    """The alternative L2 of one stage: summed over (C, H, W), averaged over the batch."""
    student, teacher = full_precision(student), full_precision(teacher)
    off = (student + margin).pow(2) * ((student > -margin) & (teacher <= 0))
    on = (student - margin).pow(2) * ((student <= margin) & (teacher > 0))
    return (off + on).sum() / student.shape[0]


def ab_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], margin: float) -> torch.Tensor:
    """The stages' boundary losses, the deepest weighing 1, each shallower one half the next."""
    return tensor_sum(w * boundary_loss(s, t, margin) for w, s, t in zip(stage_weights(len(student)), student, teacher))


@register_method("ab")
class ActivationBoundaries(PreReluDistiller):
    loss_weights = ("ab_init_weight", "ab_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        ab_init_weight: NonNegative,
        ab_weight: NonNegative,
        margin: Positive,
        init_epochs: NonNegativeInt,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        self.ab_init_weight, self.ab_weight, self.margin = ab_init_weight, ab_weight, margin
        self.init_epochs = init_epochs if ab_init_weight else 0  # a phase with its only term left out is no phase
        # no connectors when no AB term is computed (DDP: every parameter needs a gradient in some step)
        self.connectors = (
            nn.ModuleList(
                nn.Identity() if s[0] == t[0] else connector(s[0], t[0])
                for s, t in zip(self.student_shapes, self.teacher_shapes)
            )
            if ab_init_weight or ab_weight
            else None
        )

    def boundaries(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        assert self.connectors is not None  # built whenever an AB term is computed
        return ab_loss(*self.connected(self.connectors, student, teacher), self.margin)

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        if self.epoch < self.init_epochs:  # the initialisation phase: the boundaries are the only loss
            logits, student, _, teacher = self.features(images, self.ab_init_weight)
            return logits, {"ab_init": self.ab_init_weight * self.boundaries(student, teacher)}
        if not self.ab_weight:  # RepDistiller's recipe: no feature is read, the teacher runs only for KD
            logits = self.student(images)
            teacher_logits = self.teacher_logits(images) if self.kd_weight else None
            return logits, self.logit_terms(logits, teacher_logits, labels)
        logits, student, teacher_logits, teacher = self.features(images, self.ab_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        terms["ab"] = self.ab_weight * self.boundaries(student, teacher)
        return logits, terms
