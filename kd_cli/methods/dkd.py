"""`method=dkd`: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).

The paper rewrites KD's KL as TCKD + (1 - p_target^teacher) * NCKD and decouples the two parts:

    TCKD = KL(b_teacher || b_student)   b = [p_target, 1 - p_target]: target class against the rest
    NCKD = KL(q_teacher || q_student)   q = softmax over the non-target classes only
    loss = ce_weight * CE + warmup_factor * (alpha * TCKD + beta * NCKD)

Both KL terms use temperature T, are multiplied by T^2 and averaged over the batch, as in
mdistiller's `dkd_loss`. With `logit_standardization` the logits are z-scored per sample first
(Sun et al., CVPR 2024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.methods.logit_utils import tempered
from kd_cli.registry import NonNegative, Temperature


def dkd_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    *,
    logit_standardization: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each T^2 * KL(teacher || student) averaged over the batch, unweighted."""
    student = tempered(student_logits, temperature, logit_standardization)
    teacher = tempered(teacher_logits, temperature, logit_standardization)
    return tckd_loss(student, teacher, labels, temperature), nckd_loss(student, teacher, labels, temperature)


def tckd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(b_teacher || b_student) for logits already `tempered`, averaged over the batch."""
    return _kl(_binary_log_probs(student, labels), _binary_log_probs(teacher, labels)) * temperature**2


def nckd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(q_teacher || q_student) for logits already `tempered`, averaged over the batch."""
    nckd = _kl(_non_target(student, labels).log_softmax(dim=1), _non_target(teacher, labels).log_softmax(dim=1))
    return nckd * temperature**2


def warmup_factor(epoch: int, warmup: float) -> float:
    """min((epoch + 1) / warmup, 1) for the 0-based `epoch`; 1 when `warmup` is 0.

    mdistiller counts epochs from 1 and uses min(epoch / warmup, 1), so its first epoch is our epoch 0:
    both give 1/warmup in the first epoch and reach 1 in epoch number `warmup` (0-based: warmup - 1).
    """
    return min((epoch + 1) / warmup, 1.0) if warmup else 1.0


def _binary_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log [p_target, 1 - p_target] per row.

    A log-softmax over [z_target, logsumexp(z_rest)] gives both exactly, without forming 1 - p (which
    rounds to 0 for a confident model and would make mdistiller's torch.log(...) infinite).
    """
    target = logits.gather(1, labels[:, None])
    rest = _non_target(logits, labels).logsumexp(dim=1, keepdim=True)
    return torch.cat([target, rest], dim=1).log_softmax(dim=1)


def _non_target(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's logits without its target column: shape (batch, classes - 1).

    Dropping the column is exact where mdistiller subtracts 1000 from it before the softmax.
    """
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    return logits[keep].view(len(logits), -1)


def _kl(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


@register_method("dkd")
class DKD(Distiller):
    reads_teacher_logits_only = True
    loss_weights = ("ce_weight", "alpha", "beta")

    # warmup: epochs over which the KD part ramps up (0 or 1: none); a fraction of an epoch count is allowed
    def __init__(
        self,
        student,
        teacher,
        *,
        ce_weight: NonNegative,
        alpha: NonNegative,
        beta: NonNegative,
        temperature: Temperature,
        warmup: NonNegative,
        logit_standardization: bool,
    ):
        super().__init__(student, teacher)
        self.ce_weight, self.alpha, self.beta = ce_weight, alpha, beta
        self.temperature, self.warmup = temperature, warmup
        self.logit_standardization = logit_standardization

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        terms = {}
        if self.alpha or self.beta:  # a term whose weight is 0 is left out (dkd_losses, one part at a time)
            teacher_logits = self.teacher_logits(images)
            student = tempered(logits.float(), self.temperature, self.logit_standardization)
            teacher = tempered(teacher_logits.float(), self.temperature, self.logit_standardization)
            ramp = warmup_factor(self.epoch, self.warmup)
            if self.alpha:
                terms["tckd"] = ramp * self.alpha * tckd_loss(student, teacher, labels, self.temperature)
            if self.beta:
                terms["nckd"] = ramp * self.beta * nckd_loss(student, teacher, labels, self.temperature)
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(logits, labels)
        return logits, terms
