"""`method=skd`: the pair-wise term of structured distillation (Liu et al., "Structured Knowledge
Distillation for Semantic Segmentation", CVPR 2019), as CIRKD writes it (`losses/skd.py`,
CriterionStructuralKD), with pixel-wise KD beside it as in CIRKD's recipe.

The head's last hidden map (before the classifier) of each model is max-pooled in `patch` x `patch`
cells, each cell's feature vector L2-normalised, and the cosine similarity of every pair of cells taken:
an (N, N) affinity per image. The loss is the mean squared difference of the student's and teacher's
affinities. Channel counts may differ (an affinity has none); a teacher map of another size is resized
to the student's (bilinear) first. Defaults: CIRKD's Cityscapes script (`--lambda-skd 10 --lambda-kd 1`;
its adversarial term is not part of kd), patch 2.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import HeadMapDistiller
from kd_cli.methods.feature_utils import full_precision
from kd_cli.methods.seg_logits import align_to
from kd_cli.registry import NonNegative, PositiveInt

# An affinity of N cells holds N^2 numbers per image (and its gradient as many): 4096 cells is 64 MiB a
# batch of 16 in float32, what CIRKD's Cityscapes crops give at 1/8 resolution after the pooling.
MAX_CELLS = 4096


def affinity(features: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, N): cosine similarity of every pair of `patch` x `patch` max-pooled cells."""
    pooled = F.max_pool2d(features, kernel_size=patch, stride=patch, ceil_mode=True)
    cells = F.normalize(pooled, p=2, dim=1).flatten(2)  # (B, C, N), unit vectors
    return cells.transpose(1, 2) @ cells


def skd_pairwise_loss(student: torch.Tensor, teacher: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """Mean over images and cell pairs of the squared difference of the affinities."""
    student, teacher = full_precision(student), full_precision(align_to(teacher, student))
    return (affinity(student, patch) - affinity(teacher, patch)).pow(2).mean()


@register_method("skd")
class StructuredKD(HeadMapDistiller):
    loss_weights = ("skd_weight", "ce_weight", "kd_weight")

    def __init__(self, student, teacher, *, skd_weight: NonNegative, patch: PositiveInt, **common: Any):
        super().__init__(student, teacher, **common)
        self.skd_weight, self.patch = skd_weight, patch
        height, width = self.student_shapes[0][-2:]
        cells = math.ceil(height / patch) * math.ceil(width / patch)
        if cells > MAX_CELLS:
            fitting = next(
                p
                for p in range(patch, max(height, width) + 1)
                if math.ceil(height / p) * math.ceil(width / p) <= MAX_CELLS
            )
            raise KdError(
                f"method=skd: {self.student_layers[0]} is {height}x{width}; in {patch}x{patch} cells that is "
                f"{cells} cells, an affinity of {cells}x{cells} per image (at most {MAX_CELLS} cells); set "
                f"method.patch={fitting} or tap a coarser layer (method.student_layers, method.teacher_layers)"
            )

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.skd_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.skd_weight:
            terms["skd"] = self.skd_weight * skd_pairwise_loss(student[0], teacher[0], self.patch)
        return logits, terms
