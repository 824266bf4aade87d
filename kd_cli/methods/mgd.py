"""`method=mgd`: masked generative distillation (Yang et al., "Masked Generative Distillation", ECCV 2022),
on the FPN levels.

Per level: the student's map (through a 1x1 conv to the teacher's channels where they differ) has a random
`lambda_mgd` share of its pixels zeroed (one mask for all channels of an image), a generation block
(3x3 conv, ReLU, 3x3 conv) must rebuild the teacher's map from what is left; the term is the summed
squared error over the batch size, times `alpha_mgd`, summed over levels (the authors' `FeatureLoss`:
alpha 2e-5 and lambda 0.65 for RetinaNet on COCO's 256-channel levels; a small detector's levels hold a
few thousand values where COCO's hold millions, so raise alpha with them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd_cli.methods import register_method
from kd_cli.methods.fpn_base import FpnDistiller, Levels, connectors
from kd_cli.registry import NonNegative, Positive, Probability


def generation_block(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1)
    )


def mgd_loss(student: torch.Tensor, teacher: torch.Tensor, generation: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """sum((generation(student * keep) - teacher)^2) / N; `keep` (N, 1, H, W) is 1 where a pixel is kept."""
    rebuilt = generation(student * keep)
    return (rebuilt - teacher).pow(2).sum() / teacher.shape[0]


def random_keep(like: torch.Tensor, lambda_mgd: float) -> torch.Tensor:
    """(N, 1, H, W): 0 on a random `lambda_mgd` share of the pixels (the authors' draw: rand > 1 - lambda)."""
    draw = torch.rand((like.shape[0], 1, *like.shape[2:]), device=like.device)
    return (draw <= 1 - lambda_mgd).to(like.dtype)


@register_method("mgd")
class MGD(FpnDistiller):
    loss_weights = ("alpha_mgd",)

    def __init__(self, student, teacher, *, alpha_mgd: NonNegative, lambda_mgd: Probability, det_loss_scale: Positive):
        super().__init__(student, teacher, det_loss_scale=det_loss_scale)
        self.alpha_mgd, self.lambda_mgd = alpha_mgd, lambda_mgd
        self.align = connectors(self.student_channels, self.teacher_channels)
        self.generation = nn.ModuleList(generation_block(c) for c in self.teacher_channels)

    def level_terms(self, student: Levels, teacher: Levels, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        loss = torch.stack(
            [
                mgd_loss(align(s).float(), t.float(), generate, random_keep(t, self.lambda_mgd))
                for align, generate, s, t in zip(self.align, self.generation, student, teacher)
            ]
        ).sum()
        return {"mgd": self.alpha_mgd * loss}
