"""`method=sp`: Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019).

G = Q Q^T for the batch's flattened features Q (b x chw), each row L2-normalised; the loss is
||G_t - G_s||_F^2 / b^2 (the paper's equation 4), summed over the layer pairs. The default pair
is the last stage (RepDistiller's feat[-2]). Shapes may differ entirely: only b x b matrices are
compared. A batch of one has no relations (G would be the constant 1): KdError.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import check_relation_batch, feature_layers, sample_vectors, tensor_sum
from kd_cli.registry import NonNegative


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, B) Gram matrix of the flattened features with unit-norm rows."""
    flat = sample_vectors(features)
    return F.normalize(flat @ flat.T, dim=1)


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    check_relation_batch("sp", len(student))
    difference = similarity_matrix(teacher) - similarity_matrix(student)
    return difference.pow(2).sum() / len(student) ** 2


@register_method("sp")
class SimilarityPreserving(FeatureDistiller):
    loss_weights = ("sp_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        sp_weight: NonNegative,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        self.sp_weight = sp_weight

    def default_layers(self, model: nn.Module) -> list[str]:
        return list(feature_layers(model))[-1:]  # the last stage, before pooling

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.sp_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.sp_weight:
            terms["sp"] = self.sp_weight * tensor_sum(sp_loss(s, t) for s, t in zip(student, teacher))
        return logits, terms
