"""`method=ifvd`: intra-class feature variation distillation (Wang et al., "Intra-class Feature Variation
Distillation for Semantic Segmentation", ECCV 2020), as CIRKD writes it (`losses/ifvd.py`, CriterionIFV),
with pixel-wise KD beside it as in CIRKD's recipe.

On the head's last hidden map of each model, every class present in an image has a centre (the mean
feature over its pixels, the mask resized to the map by nearest neighbour); each pixel's cosine
similarity to its class's centre forms a map (an ignored pixel is its own centre: similarity 1 in both).
The loss is the mean squared difference of the student's and teacher's maps. Channel counts may differ;
a teacher map of another size is resized to the student's (bilinear) first. Defaults: CIRKD's Cityscapes
script (`--lambda-ifv 20 --lambda-kd 1`; the IFVD paper used 200 with its own adversarial terms).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd_cli.methods import register_method
from kd_cli.methods.base import HeadMapDistiller
from kd_cli.methods.feature_utils import full_precision
from kd_cli.methods.seg_logits import align_to
from kd_cli.registry import NonNegative

CENTRE_EPS = 1e-6  # the authors' guard on the pixel count of a class that is absent


def centre_similarity(features: torch.Tensor, masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C, H, W) features, (B, H, W) class indices at that size -> (B, H, W): each pixel's cosine
    similarity to the mean feature of its class in its image (its own feature where its label is ignored)."""
    classes = torch.arange(num_classes, device=masks.device)
    member = (masks[:, None] == classes[None, :, None, None]).to(features.dtype)  # (B, K, H, W)
    sums = torch.einsum("bkhw,bchw->bkc", member, features)
    centres = sums / (member.sum(dim=(2, 3))[..., None] + CENTRE_EPS)
    unlabelled = 1 - member.sum(dim=1, keepdim=True)  # 1 where no class claims the pixel (ignored)
    pixel_centres = torch.einsum("bkhw,bkc->bchw", member, centres) + unlabelled * features
    return F.cosine_similarity(features, pixel_centres, dim=1)


def ifvd_loss(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """MSE between the student's and teacher's pixel-to-class-centre similarity maps."""
    student, teacher = full_precision(student), full_precision(align_to(teacher, student))
    small = F.interpolate(masks[:, None].float(), size=student.shape[-2:], mode="nearest")[:, 0].long()
    return F.mse_loss(centre_similarity(student, small, num_classes), centre_similarity(teacher, small, num_classes))


@register_method("ifvd")
class IFVD(HeadMapDistiller):
    loss_weights = ("ifvd_weight", "ce_weight", "kd_weight")

    def __init__(self, student, teacher, *, ifvd_weight: NonNegative, **common: Any):
        super().__init__(student, teacher, **common)
        self.ifvd_weight = ifvd_weight

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.ifvd_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.ifvd_weight:
            loss = ifvd_loss(student[0], teacher[0], labels, logits.shape[1])
            terms["ifvd"] = self.ifvd_weight * loss
        return logits, terms
