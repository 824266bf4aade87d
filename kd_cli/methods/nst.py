"""`method=nst`: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (2017).

Each channel of a (C, H, W) map is one sample of a distribution: its H*W responses, L2-normalised. The
loss is the squared maximum mean discrepancy between the student's channels and the teacher's under
the paper's polynomial kernel k(x, y) = (x . y)^2 (d=2, c=0):

    MMD^2 = mean_{t,t'} k(t, t') + mean_{s,s'} k(s, s') - 2 mean_{s,t} k(s, t)

over the channel pairs of each sample, averaged over the batch, summed over the stage pairs
(RepDistiller's NSTLoss in its full form; the teacher-teacher term carries no gradient, it only makes
the loss 0 for equal maps). Channel counts may differ (the channels are compared as sets); unequal
grids are matched by average-pooling the larger map to the smaller grid, as RepDistiller does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import area_scale, full_precision, match_spatial, tensor_sum
from kd_cli.registry import NonNegative, PositiveInt


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, Ca, D), (B, Cb, D) -> (B, Ca, Cb): (a_i . b_j)^2 for every channel pair of each sample."""
    return (a @ b.transpose(1, 2)).pow(2)


def nst_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared MMD between the two maps' channel distributions, averaged over the batch."""
    student, teacher = match_spatial(full_precision(student), full_precision(teacher))
    s = F.normalize(student.flatten(2), dim=2)
    t = F.normalize(teacher.flatten(2), dim=2)
    return polynomial_kernel(t, t).mean() + polynomial_kernel(s, s).mean() - 2 * polynomial_kernel(s, t).mean()


@register_method("nst")
class NeuronSelectivityTransfer(FeatureDistiller):
    loss_weights = ("nst_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        nst_weight: NonNegative,
        tuned_input_size: PositiveInt | None,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        self.require_maps()
        self.nst_weight = nst_weight * area_scale(student, tuned_input_size)

    # default_layers: every stage output (the base's), as RepDistiller's feat[1:-1]

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.nst_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.nst_weight:
            terms["nst"] = self.nst_weight * tensor_sum(nst_loss(s, t) for s, t in zip(student, teacher))
        return logits, terms
