"""`method=fpn_cwd`: channel-wise distillation (Shu et al., ICCV 2021) on a detector's FPN levels, as
mmrazor's detection configs apply it (`ChannelWiseDivergence` on every neck output, tau 1, weight 10:
cwd_fpn_frcnn_r101_frcnn_r50_1x_coco).

Per level, each channel's map becomes a distribution over its pixels (softmax of map / tau); the term is
`cwd.cwd_loss` (KL from the teacher's to the student's, tau^2 / (C * N)), summed over levels, times
`cwd_weight`. Where the student's levels are narrower than the teacher's, a 1x1 conv maps them first (the
authors pair FPNs of equal width).
"""

from __future__ import annotations

from typing import Any

import torch

from kd_cli.methods import register_method
from kd_cli.methods.cwd import cwd_loss
from kd_cli.methods.fpn_base import FpnDistiller, Levels, connectors
from kd_cli.registry import NonNegative, Positive, Temperature


@register_method("fpn_cwd")
class FpnCWD(FpnDistiller):
    loss_weights = ("cwd_weight",)

    def __init__(self, student, teacher, *, tau: Temperature, cwd_weight: NonNegative, det_loss_scale: Positive):
        super().__init__(student, teacher, det_loss_scale=det_loss_scale)
        self.tau, self.cwd_weight = tau, cwd_weight
        self.connectors = connectors(self.student_channels, self.teacher_channels)

    def level_terms(self, student: Levels, teacher: Levels, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = zip(self.connectors, student, teacher)
        loss = torch.stack([cwd_loss(c(s).float(), t.float(), self.tau) for c, s, t in pairs]).sum()
        return {"cwd": self.cwd_weight * loss}
