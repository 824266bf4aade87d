"""`method=dist`: Huang et al., "Knowledge Distillation from A Stronger Teacher" (DIST, NeurIPS 2022).

DIST matches relations instead of exact probabilities: with p = softmax(z / T) and Pearson
correlation rho,

    inter = T^2 * (1 - mean_i rho(p_student[i, :], p_teacher[i, :]))   classes within each sample
    intra = T^2 * (1 - mean_c rho(p_student[:, c], p_teacher[:, c]))   samples within each class
    loss  = ce_weight * CE + beta * inter + gamma * intra

With `logit_standardization` the logits are z-scored per sample first (Sun et al., CVPR 2024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.methods.logit_utils import tempered
from kd_cli.registry import NonNegative, Temperature

# Guards the correlation of a constant vector (e.g. a class column over identical samples): it is
# undefined, and is taken as 0. The authors' code adds this eps to the norms' product instead of
# clamping it, which biases every correlation slightly; clamping leaves defined ones exact.
PEARSON_EPS = 1e-8


def dist_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    *,
    logit_standardization: bool = False,
    inter: bool = True,
    intra: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(inter, intra), each already multiplied by T^2, unweighted; a term not asked for is None (intra needs
    2 samples per batch, so leaving it out also trains with a batch of one)."""
    p_student, p_teacher = soft_targets(student_logits, teacher_logits, temperature, logit_standardization)
    scale = temperature**2
    return (
        scale * inter_class_relation(p_student, p_teacher) if inter else None,
        scale * intra_class_relation(p_student, p_teacher) if intra else None,
    )


def soft_targets(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, logit_standardization: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        tempered(student_logits, temperature, logit_standardization).softmax(dim=1),
        tempered(teacher_logits, temperature, logit_standardization).softmax(dim=1),
    )


def inter_class_relation(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """1 - the mean over samples of the Pearson correlation across classes."""
    return 1 - pearson_rows(p_student, p_teacher).mean()


def intra_class_relation(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """1 - the mean over classes of the Pearson correlation across the batch's samples."""
    if len(p_student) < 2:
        # A correlation over one sample is undefined; the authors' code silently returns the constant 1
        # (no gradient), which would hide that the term does nothing. Say so instead.
        raise KdError(
            "method=dist: the intra-class relation correlates each class over the batch, which needs "
            "at least 2 samples per batch; raise trainer.batch_size or set method.gamma=0"
        )
    return 1 - pearson_rows(p_student.T, p_teacher.T).mean()


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Pearson correlation of each row of `a` with the same row of `b`: the cosine of the centred rows."""
    return F.cosine_similarity(a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True), dim=1, eps=PEARSON_EPS)


@register_method("dist")
class DIST(Distiller):
    reads_teacher_logits_only = True
    loss_weights = ("ce_weight", "beta", "gamma")

    def __init__(
        self,
        student,
        teacher,
        *,
        ce_weight: NonNegative,
        beta: NonNegative,
        gamma: NonNegative,
        temperature: Temperature,
        logit_standardization: bool,
    ):
        super().__init__(student, teacher)
        self.ce_weight, self.beta, self.gamma = ce_weight, beta, gamma
        self.temperature = temperature
        self.logit_standardization = logit_standardization

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        terms = {}
        if self.beta or self.gamma:  # a term whose weight is 0 is left out
            inter, intra = dist_losses(
                logits.float(),
                self.teacher_logits(images).float(),
                self.temperature,
                logit_standardization=self.logit_standardization,
                inter=bool(self.beta),
                intra=bool(self.gamma),
            )
            if inter is not None:
                terms["inter"] = self.beta * inter
            if intra is not None:
                terms["intra"] = self.gamma * intra
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(logits, labels)
        return logits, terms
