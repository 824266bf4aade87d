"""`method=pkd`: Pearson correlation distillation (Cao et al., "PKD: General Distillation Framework for
Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022), on the FPN levels.

Each level of each model is normalised per channel to zero mean and unit variance over the batch and
its pixels (std with Bessel's correction, + 1e-6, as mmrazor's `PKDLoss`, the authors' release); the term is
the MSE of the normalised maps over 2, per level, summed over levels, times `pkd_weight` (10: mmrazor's
RetinaNet-X101 -> R50 config). The MSE of standardised maps is 1 - r, the Pearson correlation, so the
student copies the teacher's relations, not its magnitudes. Where a student level has fewer channels than
the teacher's, a 1x1 conv maps it first (the authors pair FPNs of equal width and need none).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd_cli.methods import register_method
from kd_cli.methods.fpn_base import FpnDistiller, Levels, connectors
from kd_cli.registry import NonNegative, Positive


def standardise(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) maps with each channel at zero mean, unit (unbiased) std over N, H, W."""
    per_channel = maps.transpose(0, 1).flatten(1)
    mean = per_channel.mean(1, keepdim=True)
    std = per_channel.std(1, keepdim=True)
    return ((per_channel - mean) / (std + 1e-6)).reshape(maps.shape[1], maps.shape[0], *maps.shape[2:]).transpose(0, 1)


def pkd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE of the standardised maps over 2: (1 - Pearson r) per element, up to the 1e-6."""
    return F.mse_loss(standardise(student), standardise(teacher)) / 2


@register_method("pkd")
class PKD(FpnDistiller):
    loss_weights = ("pkd_weight",)

    def __init__(self, student, teacher, *, pkd_weight: NonNegative, det_loss_scale: Positive):
        super().__init__(student, teacher, det_loss_scale=det_loss_scale)
        self.pkd_weight = pkd_weight
        self.connectors = connectors(self.student_channels, self.teacher_channels)

    def level_terms(self, student: Levels, teacher: Levels, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        loss = torch.stack(
            [pkd_loss(c(s).float(), t.float()) for c, s, t in zip(self.connectors, student, teacher)]
        ).sum()
        return {"pkd": self.pkd_weight * loss}
