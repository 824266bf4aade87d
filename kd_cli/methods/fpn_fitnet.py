"""`method=fpn_fitnet`: FPN feature imitation with connectors, FitNet's hint loss on a detector's levels
(Romero et al., "FitNets", ICLR 2015; on detectors: Chen et al., "Learning Efficient Object Detection
Models with Knowledge Distillation", NeurIPS 2017, whose adaptation layer is this 1x1 conv).

Per level, a 1x1 conv maps the student's map to the teacher's channels; the term is the MSE (mean over
elements) against the teacher's map, summed over levels, times `hint_weight`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd_cli.methods import register_method
from kd_cli.methods.fpn_base import FpnDistiller, Levels, connectors
from kd_cli.registry import NonNegative, Positive


@register_method("fpn_fitnet")
class FpnFitNet(FpnDistiller):
    loss_weights = ("hint_weight",)

    def __init__(self, student, teacher, *, hint_weight: NonNegative, det_loss_scale: Positive):
        super().__init__(student, teacher, det_loss_scale=det_loss_scale)
        self.hint_weight = hint_weight
        self.connectors = connectors(self.student_channels, self.teacher_channels, always=True)

    def level_terms(self, student: Levels, teacher: Levels, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        loss = torch.stack(
            [F.mse_loss(c(s).float(), t.float()) for c, s, t in zip(self.connectors, student, teacher)]
        ).sum()
        return {"hint": self.hint_weight * loss}
