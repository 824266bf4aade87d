"""`method=at`: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017).

The attention map of a (C, H, W) feature is the channel mean of |f|^p (p=2), flattened and
L2-normalised per sample; the loss is the mean squared difference of the student's and teacher's
maps (RepDistiller's formulation, for which its beta=1000 is tuned), summed over the stage pairs.
Channel counts may differ (the map averages them away); unequal grids are matched by
average-pooling the larger feature map to the smaller grid before the attention (as RepDistiller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import full_precision, match_spatial, require_maps
from kd_cli.registry import NonNegative, Positive


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): mean over channels of |f|^p, unit L2 norm per sample."""
    return F.normalize(features.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    """Mean over samples and positions of the squared difference of the attention maps."""
    student, teacher = match_spatial(full_precision(student), full_precision(teacher))
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


@register_method("at")
class AttentionTransfer(FeatureDistiller):
    loss_weights = ("at_weight", "ce_weight", "kd_weight")

    def __init__(self, student, teacher, *, student_layers: list[str] | None, teacher_layers: list[str] | None,
                 ce_weight: NonNegative, kd_weight: NonNegative, temperature: Positive, at_weight: NonNegative,
                 p: Positive):
        super().__init__(student, teacher, student_layers=student_layers, teacher_layers=teacher_layers,
                         ce_weight=ce_weight, kd_weight=kd_weight, temperature=temperature)
        for layer, shape in zip(self.student_layers, self.student_shapes):
            require_maps("at", "student", layer, shape)
        for layer, shape in zip(self.teacher_layers, self.teacher_shapes):
            require_maps("at", "teacher", layer, shape)
        self.at_weight, self.p = at_weight, p

    # default_layers: every stage output (the base's), as RepDistiller's feat[1:-1]

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.at_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.at_weight:
            terms["at"] = self.at_weight * sum(at_loss(s, t, self.p) for s, t in zip(student, teacher))
        return logits, terms
