"""`method=srd`: Yang et al., "Knowledge Distillation via Softmax Regression Representation Learning"
(ICLR 2021; SRRL, torchdistill's SRD).

The student's last feature map goes through a connector (1x1 convolution without bias, BatchNorm,
ReLU: the authors' `transfer_conv`) into the teacher's channels. Two terms then compare it with the
teacher's last feature map:

    feature:  mean over the batch and channels of (spatial mean of the connected student map -
              spatial mean of the teacher's)^2  (the authors' `statm_loss`)
    softmax regression: the teacher's own head (everything after its last stage, frozen, in eval
              mode) run on the connected student map, its logits against the teacher's by MSE over
              every logit (`F.mse_loss(pred_sc, pred_t)`)

The teacher's head is reached by running the teacher with its last stage's output replaced by the
connected student map, so it works for any architecture (the layers before it run without gradient).
A connected map on another grid than the teacher's is average-pooled (or repeated) to it first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import feature_layers, full_precision
from kd_cli.models.features import resolve_modules
from kd_cli.registry import NonNegative


def srd_feature_loss(connected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and channels of the squared difference of the maps' spatial means."""
    gap = full_precision(connected).flatten(2).mean(2) - full_precision(teacher).flatten(2).mean(2)
    return gap.pow(2).mean()


def srd_logit_loss(regressed_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """MSE over every logit of the teacher's head on the student's features and the teacher's own."""
    return F.mse_loss(full_precision(regressed_logits), full_precision(teacher_logits))


def connector(student_channels: int, teacher_channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(student_channels, teacher_channels, 1, bias=False), nn.BatchNorm2d(teacher_channels), nn.ReLU()
    )


@register_method("srd")
class SoftmaxRegressionDistillation(FeatureDistiller):
    single_layer = True  # the last stage of each model
    loss_weights = ("feature_weight", "logit_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        feature_weight: NonNegative,
        logit_weight: NonNegative,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        self.require_maps()
        self.feature_weight, self.logit_weight = feature_weight, logit_weight
        used = feature_weight or logit_weight  # no adapter for terms left out (DDP: every parameter gets a gradient)
        self.connector = connector(self.student_shapes[0][0], self.teacher_shapes[0][0]) if used else None

    def default_layers(self, model: nn.Module) -> list[str]:
        return list(feature_layers(model))[-1:]  # the last stage, before pooling

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.feature_weight or self.logit_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.connector is None:
            return logits, terms
        connected = self.connector(student[0])
        if connected.shape[2:] != teacher[0].shape[2:]:
            height, width = teacher[0].shape[2:]  # maps (require_maps)
            connected = F.adaptive_avg_pool2d(connected, (height, width))
        if self.feature_weight:
            terms["srd_feature"] = self.feature_weight * srd_feature_loss(connected, teacher[0])
        if self.logit_weight:
            assert teacher_logits is not None  # `features` runs the teacher whenever a term reads it
            terms["srd_logits"] = self.logit_weight * srd_logit_loss(
                self.teacher_head(images, connected), teacher_logits
            )
        return logits, terms

    def teacher_head(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The teacher's logits with its last stage's output replaced by `features` (gradient to them only)."""
        (layer,) = resolve_modules(self.teacher, self.teacher_layers).values()
        handle = layer.register_forward_hook(lambda module, args, output: features.to(output.dtype))
        try:
            return self.teacher(images)
        finally:
            handle.remove()
