"""`method=at`: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017).

The attention map of a (C, H, W) feature is the channel mean of |f|^p (p=2), flattened and
L2-normalised per sample; the loss is the mean squared difference of the student's and teacher's
maps (the authors' code and RepDistiller's formulation, for which beta=1000 is tuned), summed over
the stage pairs. `form=paper` takes the paper's equation 2 instead: beta/2 times the (un-squared) L2
norm of each sample's difference, summed over the batch, with the paper's beta of 1000 "divided by
the number of elements in the attention map and the batch size" (so the same at_weight serves both).
Channel counts may differ (the map averages them away); unequal grids are matched by
average-pooling the larger feature map to the smaller grid before the attention (as RepDistiller).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import area_scale, full_precision, match_spatial, tensor_sum
from kd_cli.registry import NonNegative, Positive, PositiveInt


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): mean over channels of |f|^p, unit L2 norm per sample."""
    return F.normalize(features.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float, form: str = "code") -> torch.Tensor:
    """`code`: mean over samples and positions of the squared difference of the attention maps.
    `paper`: sum over samples of half the L2 norm of the difference, / (positions * batch)."""
    student, teacher = match_spatial(full_precision(student), full_precision(teacher))
    difference = attention_map(student, p) - attention_map(teacher, p)
    if form == "paper":
        return difference.norm(dim=1).sum() / (2 * difference.numel())
    return difference.pow(2).mean()


@register_method("at")
class AttentionTransfer(FeatureDistiller):
    tasks = ("classification", "segmentation")  # on a segmenter: its backbone stages, KD pixel-wise
    loss_weights = ("at_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        at_weight: NonNegative,
        p: Positive,
        form: Literal["code", "paper"],
        tuned_input_size: PositiveInt | None,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        self.require_maps()
        self.at_weight, self.p, self.form = at_weight * area_scale(student, tuned_input_size), p, form

    # default_layers: every stage output (the base's), as RepDistiller's feat[1:-1]

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.at_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.at_weight:
            loss = tensor_sum(at_loss(s, t, self.p, self.form) for s, t in zip(student, teacher))
            terms["at"] = self.at_weight * loss
        return logits, terms
