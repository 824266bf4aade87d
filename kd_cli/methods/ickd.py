"""`method=ickd`: Liu et al., "Exploring Inter-Channel Correlation for Diversity-preserved Knowledge
Distillation" (ICCV 2021).

The student's map is embedded into the teacher's channels (a 1x1 convolution without bias, then
BatchNorm: the authors' `Embed`). Each sample's inter-channel correlation is G = F F^T for its map
F reshaped to (C, H*W), each row of G L2-normalised; the loss is the squared Frobenius distance of
the student's and the teacher's G, divided by C times the batch size (the authors' ICKDLoss, CIFAR
code). Grids may differ: G is C x C whatever the map's size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import feature_layers, full_precision, tensor_sum
from kd_cli.registry import NonNegative


def channel_correlation(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C): F F^T per sample, each row L2-normalised."""
    flat = full_precision(features).flatten(2)
    return F.normalize(flat @ flat.transpose(1, 2), dim=2)


def ickd_loss(embedded_student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||G_s - G_t||_F^2 summed over the batch, / (C * B); both maps have the teacher's C channels."""
    batch, channels = teacher.shape[:2]
    difference = channel_correlation(embedded_student) - channel_correlation(teacher)
    return difference.pow(2).sum() / (channels * batch)


def embed(student_channels: int, teacher_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False), nn.BatchNorm2d(teacher_channels))


@register_method("ickd")
class InterChannelCorrelation(FeatureDistiller):
    loss_weights = ("ickd_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        ickd_weight: NonNegative,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        self.require_maps()
        # no adapter for a term left out (DDP: every parameter must get a gradient)
        self.embeds = nn.ModuleList(
            [embed(s[0], t[0]) for s, t in zip(self.student_shapes, self.teacher_shapes)] if ickd_weight else []
        )
        self.ickd_weight = ickd_weight

    def default_layers(self, model: nn.Module) -> list[str]:
        return list(feature_layers(model))[-1:]  # the last stage, before pooling (the authors' feat[-2])

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.ickd_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.ickd_weight:
            loss = tensor_sum(ickd_loss(embed(s), t) for embed, s, t in zip(self.embeds, student, teacher))
            terms["ickd"] = self.ickd_weight * loss
        return logits, terms
