"""Helpers shared by the logit methods (kd, dkd, dist, and every method with a KD term): Hinton's KD
loss, logit standardization.

Logit standardization: Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024).
Each sample's logits are z-scored over the classes before the temperature is applied, so the
student matches the teacher's logit *relations* rather than their range and scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Added to the standard deviation as in the authors' code (`normalize` in their KD.py), so a sample
# whose logits are all equal (std 0) standardizes to zeros instead of dividing by zero.
STANDARDIZE_EPS = 1e-7


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each row over the classes: (z - mean) / (std + eps).

    The std is Bessel-corrected (torch's default), as in the authors' code; the choice only rescales
    every standardized logit by the same sqrt(C / (C - 1)).
    """
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + STANDARDIZE_EPS)


def tempered(logits: torch.Tensor, temperature: float | torch.Tensor, logit_standardization: bool) -> torch.Tensor:
    """Logits ready for a temperature softmax: standardized first when asked, then divided by T."""
    if logit_standardization:
        logits = standardize(logits)
    return logits / temperature


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    logit_standardization: bool = False,
) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch."""
    log_p_student = F.log_softmax(tempered(student_logits, temperature, logit_standardization), dim=1)
    log_p_teacher = F.log_softmax(tempered(teacher_logits, temperature, logit_standardization), dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2
