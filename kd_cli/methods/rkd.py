"""`method=rkd`: Park et al., "Relational Knowledge Distillation" (CVPR 2019).

Distance-wise: the pairwise Euclidean distances of a batch's embeddings, each divided by their
mean over the pairs i != j (the paper's mu), matched by the Huber loss (smooth L1, delta 1).
Angle-wise: for every triplet (i, j, k) the cosine of the angle at j between e_i and e_k,
matched by the Huber loss. Both are averaged over all b^2 (b^3) entries, diagonal included, as
in the authors' and RepDistiller's code (its internal weights 25 and 50 are tuned for that).
The two weighted terms are logged separately (`rkd_distance`, `rkd_angle`); a zero weight skips
its term (the angle term costs b^3 memory). Student and teacher dimensions may differ.
A batch of one has no relations: KdError.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller, embedding_layers
from kd_cli.methods.feature_utils import check_relation_batch, sample_vectors, tensor_sum
from kd_cli.registry import NonNegative

EPS = 1e-12  # keeps sqrt differentiable at a zero distance and the mean distance non-zero


def pairwise_distances(features: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean distances with an exact-zero diagonal."""
    squared = (features[:, None] - features[None]).pow(2).sum(-1)
    off_diagonal = 1 - torch.eye(len(features), dtype=features.dtype, device=features.device)
    return squared.clamp_min(EPS).sqrt() * off_diagonal


def normalised_distances(features: torch.Tensor) -> torch.Tensor:
    distances = pairwise_distances(features)
    pairs = len(features) * (len(features) - 1)
    return distances / (distances.sum() / pairs).clamp_min(EPS)


def triplet_angles(features: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B, B): [j, i, k] = cos of the angle at e_j between e_i and e_k (0 if degenerate)."""
    directions = F.normalize(features[None] - features[:, None], dim=2)  # [j, i] = unit(e_i - e_j)
    return directions @ directions.transpose(1, 2)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    check_relation_batch("rkd", len(student))
    return F.smooth_l1_loss(
        normalised_distances(sample_vectors(student)), normalised_distances(sample_vectors(teacher))
    )


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    check_relation_batch("rkd", len(student))
    return F.smooth_l1_loss(triplet_angles(sample_vectors(student)), triplet_angles(sample_vectors(teacher)))


@register_method("rkd")
class RKD(FeatureDistiller):
    loss_weights = ("distance_weight", "angle_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        distance_weight: NonNegative,
        angle_weight: NonNegative,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def default_layers(self, model: nn.Module) -> list[str]:
        return embedding_layers(model)  # RepDistiller's feat[-1]: the pooled embedding

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.distance_weight or self.angle_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        pairs = list(zip(student, teacher))
        if self.distance_weight:
            terms["rkd_distance"] = self.distance_weight * tensor_sum(rkd_distance_loss(s, t) for s, t in pairs)
        if self.angle_weight:
            terms["rkd_angle"] = self.angle_weight * tensor_sum(rkd_angle_loss(s, t) for s, t in pairs)
        return logits, terms
