"""`method=tfkd`: Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization"
(CVPR 2020): Tf-KD_reg, distillation from a virtual teacher; no teacher network is trained or read.

The virtual teacher puts `correct_prob` on the label and spreads the rest evenly over the other
K - 1 classes; its distribution is softened as the authors' code does it, softmax(p^d / T) (a
softmax of the probabilities, which at T=20 is close to uniform with a little more on the label).
The loss is KL(softened teacher || softmax(student logits)) with the student at temperature 1,
summed and divided by batch * K (torch's KLDivLoss `mean`, the authors' reduction), so

    loss = ce_weight * CE + tfkd_weight * KL / K

and the authors' (1 - reg_alpha) * CE + reg_alpha * multiplier * KLDivLoss() is ce_weight = 0.9,
tfkd_weight = 0.1 * 100 = 10 (their CIFAR-100 params.json: reg_alpha 0.1, multiplier 100, T 20).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.registry import NonNegative, OpenFraction, Temperature


def virtual_teacher(
    labels: torch.Tensor, classes: int, correct_prob: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B,) labels -> (B, K): `correct_prob` on the label, (1 - correct_prob) / (K - 1) on each other class."""
    rest = (1.0 - correct_prob) / (classes - 1)
    teacher = torch.full((len(labels), classes), rest, dtype=dtype, device=labels.device)
    return teacher.scatter_(1, labels[:, None], correct_prob)


def tfkd_loss(logits: torch.Tensor, labels: torch.Tensor, correct_prob: float, temperature: float) -> torch.Tensor:
    """KL(softmax(p^d / T) || softmax(logits)) summed over the batch and classes, / (batch * K)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    target = (virtual_teacher(labels, logits.shape[1], correct_prob, logits.dtype) / temperature).softmax(1)
    kl = F.kl_div(logits.log_softmax(1), target, reduction="sum")
    return kl / logits.numel()


@register_method("tfkd")
class TeacherFreeKD(Distiller):
    requires_teacher = False  # the teacher is the virtual distribution above
    loss_weights = ("ce_weight", "tfkd_weight")

    def __init__(
        self,
        student,
        teacher=None,
        *,
        ce_weight: NonNegative,
        tfkd_weight: NonNegative,
        temperature: Temperature,
        correct_prob: OpenFraction,
    ):
        super().__init__(student, None)  # a teacher, if one is around, is ignored
        classes = getattr(student, "kd_num_classes", None)
        if tfkd_weight and classes and correct_prob <= 1 / classes:
            raise KdError(
                f"method.correct_prob={correct_prob} must be above 1/{classes} (the virtual teacher must "
                "prefer the label); the authors use 0.99"
            )
        self.ce_weight, self.tfkd_weight = ce_weight, tfkd_weight
        self.temperature, self.correct_prob = temperature, correct_prob

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        terms = {}
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(logits, labels)
        if self.tfkd_weight:
            terms["tfkd"] = self.tfkd_weight * tfkd_loss(logits, labels, self.correct_prob, self.temperature)
        return logits, terms
