"""`method=vid`: Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019).

For each layer pair the teacher's feature is modelled as a Gaussian whose mean a small
regressor predicts from the student's feature (three 1x1 convs with ReLUs between, hidden width
= the teacher's channels, as RepDistiller) and whose variance is learnt per teacher channel:
sigma_c^2 = softplus(alpha_c) + eps (the paper's heteroscedastic form), alpha initialised so
that sigma^2 starts at 5 (RepDistiller). The loss is the negative log-likelihood without the
constant 0.5 log(2 pi), averaged over samples, channels and positions (so it can be negative),
summed over the pairs. Unequal grids: the larger map is average-pooled to the smaller
(RepDistiller). Vectors pair with vectors through the same regressor made of linear layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import (
    full_precision,
    is_map,
    match_spatial,
    require_same_kind,
)
from kd_cli.registry import NonNegative, Positive


def vid_loss(mean: torch.Tensor, target: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Mean of 0.5 * ((target - mean)^2 / var_c + log var_c); `variance` is (C,), channels on dim 1."""
    mean, target, variance = full_precision(mean), full_precision(target), full_precision(variance)
    variance = variance.view(1, -1, *([1] * (target.dim() - 2)))
    return (0.5 * ((target - mean).pow(2) / variance + variance.log())).mean()


def _layer(maps: bool, c_in: int, c_out: int) -> nn.Module:
    return nn.Conv2d(c_in, c_out, 1, bias=False) if maps else nn.Linear(c_in, c_out, bias=False)


class VariationalHead(nn.Module):
    """The Gaussian q(teacher | student) of one layer pair: its mean regressor and its variances."""

    def __init__(
        self, student_shape: Sequence[int], teacher_shape: Sequence[int], init_variance: float, min_variance: float
    ):
        super().__init__()
        maps, c_s, c_t = is_map(student_shape), student_shape[0], teacher_shape[0]
        self.regressor = nn.Sequential(
            _layer(maps, c_s, c_t), nn.ReLU(), _layer(maps, c_t, c_t), nn.ReLU(), _layer(maps, c_t, c_t)
        )
        # inverse softplus, so that softplus(alpha) + min_variance == init_variance at the start
        alpha = math.log(math.expm1(init_variance - min_variance))
        self.alpha = nn.Parameter(torch.full((c_t,), alpha))
        self.min_variance = min_variance

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student, teacher = match_spatial(student, teacher)
        variance = F.softplus(self.alpha) + self.min_variance
        return vid_loss(self.regressor(student), teacher, variance)


@register_method("vid")
class VID(FeatureDistiller):
    loss_weights = ("vid_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        vid_weight: NonNegative,
        init_variance: Positive,
        min_variance: Positive,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        heads = []
        for s_layer, s_shape, t_layer, t_shape in zip(
            self.student_layers, self.student_shapes, self.teacher_layers, self.teacher_shapes
        ):
            require_same_kind("vid", (s_layer, s_shape), (t_layer, t_shape))
            if vid_weight:  # no adapter for a term left out (DDP: every parameter must get a gradient)
                heads.append(VariationalHead(s_shape, t_shape, init_variance, min_variance))
        self.heads = nn.ModuleList(heads)
        self.vid_weight = vid_weight

    @classmethod
    def validate_options(cls, **options: Any) -> None:
        # Taken from **options (the registry passes every option) so the signature stays the base's.
        min_variance: float = options.pop("min_variance")
        init_variance: float = options.pop("init_variance")
        super().validate_options(**options)
        if not min_variance < init_variance:  # softplus(alpha) = init - min must be > 0
            raise KdError(
                f"method vid needs 0 < min_variance < init_variance, got method.min_variance={min_variance} "
                f"and method.init_variance={init_variance}; the defaults are 1e-5 and 5.0"
            )

    # default_layers: every stage output (the base's), as RepDistiller's feat[1:-1]

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.vid_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.vid_weight:
            terms["vid"] = self.vid_weight * sum(head(s, t) for head, s, t in zip(self.heads, student, teacher))
        return logits, terms
