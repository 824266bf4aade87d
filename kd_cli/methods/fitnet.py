"""`method=fitnet`: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

A learnable regressor maps the student's guided layer onto the teacher's hint layer and the two
are matched by mean squared error. Trained in one stage together with cross-entropy, as
RepDistiller does (Tian et al., CRD, 2020; its `--distill hint -a 0 -b 100`), not in the paper's
two stages. The regressor is `feature_utils.Regressor`: conv 1x1 + BN (+ ReLU) for maps after
average-pooling the larger map to the smaller grid, linear (+ ReLU) for vectors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import Regressor, feature_layers, full_precision, require_same_kind, tensor_sum
from kd_cli.registry import NonNegative


def fitnet_loss(regressed_student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element (RepDistiller's HintLoss; the paper's 1/2 ||.||^2 up to scale)."""
    return F.mse_loss(full_precision(regressed_student), full_precision(teacher))


@register_method("fitnet")
class FitNet(FeatureDistiller):
    tasks = ("classification", "segmentation")  # on a segmenter: its backbone stages, KD pixel-wise
    loss_weights = ("fitnet_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        fitnet_weight: NonNegative,
        regressor_relu: bool,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        pairs = zip(self.student_layers, self.student_shapes, self.teacher_layers, self.teacher_shapes)
        regressors = []
        for s_layer, s_shape, t_layer, t_shape in pairs:
            require_same_kind("fitnet", (s_layer, s_shape), (t_layer, t_shape))
            if fitnet_weight:  # no adapter for a term left out (DDP: every parameter must get a gradient)
                regressors.append(Regressor(s_shape, t_shape, relu=regressor_relu))
        self.regressors = nn.ModuleList(regressors)
        self.fitnet_weight = fitnet_weight

    def default_layers(self, model: nn.Module) -> list[str]:
        # RepDistiller's hint_layer=2 indexes [stem, stage1, stage2, stage3, pooled]: the second
        # stage. kd_feature_layers lists the stages without the stem, so that is index 1.
        stages = list(feature_layers(model))
        return [stages[min(1, len(stages) - 1)]]

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.fitnet_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.fitnet_weight:
            loss = tensor_sum(fitnet_loss(*regress(s, t)) for regress, s, t in zip(self.regressors, student, teacher))
            terms["fitnet"] = self.fitnet_weight * loss
        return logits, terms
