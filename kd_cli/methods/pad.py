"""`method=pad`: Zhang et al., "Prime-Aware Adaptive Distillation" (ECCV 2020), its L2 form (PAD-L2).

A FitNet-style hint whose squared errors are weighted by an uncertainty the student predicts itself. The
teacher's feature is modelled as a Gaussian around the student's (regressed) feature, with a variance per
element predicted from the student's feature by a small branch, alpha = log sigma^2 = BN(Linear(f_s))
(a 1x1 conv + BN per position for maps). The loss is the authors' code's form of its negative
log-likelihood, as torchdistill's PADL2Loss runs it ("the author's provided code takes average of losses"):

    L = mean over samples and elements of  (f_t - r(f_s))^2 / (exp(alpha) + 1e-6) + alpha

which is twice the paper's (f_t - f_s)^2 / (2 sigma^2) + log sigma (its constants 1/2 and log sqrt(2 pi)
dropped). Elements the student cannot match get a large variance and weigh less, the prime (easy,
confident) ones more; the log term keeps the variances from growing without bound. L may be negative.

Both features are divided by the teacher feature's root mean square per sample before the loss (see
`pair_loss`: a reparametrisation of the variance that keeps an uncalibrated teacher's large features from
overflowing it). The regressor r is FitNet's (`feature_utils.Regressor`); with `regressor=auto` there is none where the
student's feature already has the teacher's shape, as in the authors' code on equal embeddings.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller, embedding_layers
from kd_cli.methods.feature_utils import (
    Regressor,
    Shape,
    full_precision,
    is_map,
    matched_size,
    pool_to,
    require_same_kind,
    tensor_sum,
)
from kd_cli.registry import NonNegative

VARIANCE_EPS = 1e-6  # the authors' code's (torchdistill's PADL2Loss eps)


def pad_loss(student: torch.Tensor, teacher: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """Mean over every element of (t - s)^2 / (exp(log_variance) + 1e-6) + log_variance (equal shapes)."""
    student, teacher, log_variance = (full_precision(x) for x in (student, teacher, log_variance))
    return ((teacher - student).pow(2) / (log_variance.exp() + VARIANCE_EPS) + log_variance).mean()


def pair_loss(regress: nn.Module, estimate: nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """pad_loss of one layer pair: the regressed pair, the log-variance estimated from the raw student feature.
    Both features are divided by the teacher feature's root mean square per sample (detached): the
    predicted variance is then relative to the teacher's own scale, a reparametrisation of the same
    Gaussian (alpha' = alpha - log c^2, the same gradients for the student's feature at the same effective
    variance) that starts the variance near the features' scale instead of 1. A trained teacher's
    features have c near 1 (the reference's numbers); an untrained or badly calibrated teacher's reach
    10-100, where the raw form's first SGD steps overflow exp(alpha) (tests/test_methods_at_defaults.py)."""
    regressed, target = regress(student, teacher)
    scale = root_mean_square(target)
    return pad_loss(regressed / scale, target / scale, estimate(student))


def root_mean_square(features: torch.Tensor) -> torch.Tensor:
    """Per sample, over every other dimension, detached and at least 1e-6, shaped to divide `features`."""
    features = full_precision(features).detach()
    dims = tuple(range(1, features.dim()))
    return features.pow(2).mean(dims, keepdim=True).sqrt().clamp_min(1e-6)


class VarianceEstimator(nn.Module):
    """The student-side branch: its raw feature -> one log-variance per element of the teacher's feature.
    Vectors: Linear + BatchNorm1d (the authors' code, torchdistill's VarianceBranch4PAD); maps: the student's
    map average-pooled to the grid the regressor compares on, then 1x1 conv + BatchNorm2d."""

    def __init__(self, student_shape: Shape, teacher_shape: Shape):
        super().__init__()
        if is_map(student_shape):
            self.size: tuple[int, int] | None = matched_size(student_shape, teacher_shape)
            channels = teacher_shape[0]
            self.net = nn.Sequential(nn.Conv2d(student_shape[0], channels, 1), nn.BatchNorm2d(channels))
        else:
            self.size = None
            self.net = nn.Sequential(nn.Linear(student_shape[0], teacher_shape[0]), nn.BatchNorm1d(teacher_shape[0]))

    def forward(self, student: torch.Tensor) -> torch.Tensor:
        return self.net(pool_to(student, self.size) if self.size is not None else student)


class Unchanged(nn.Module):
    """No regressor: the student's feature is compared as it is (already of the teacher's shape)."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return student, teacher


@register_method("pad")
class PrimeAwareAdaptiveDistillation(FeatureDistiller):
    loss_weights = ("pad_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        pad_weight: NonNegative,
        regressor: Literal["auto", "always"],
        regressor_relu: bool,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        regressors, estimators = [], []
        for s_layer, s_shape, t_layer, t_shape in zip(
            self.student_layers, self.student_shapes, self.teacher_layers, self.teacher_shapes
        ):
            require_same_kind("pad", (s_layer, s_shape), (t_layer, t_shape))
            if pad_weight:  # no adapter for a term left out (DDP: every parameter must get a gradient)
                same = tuple(s_shape) == tuple(t_shape) and regressor == "auto"
                regressors.append(Unchanged() if same else Regressor(s_shape, t_shape, relu=regressor_relu))
                estimators.append(VarianceEstimator(s_shape, t_shape))
        self.regressors = nn.ModuleList(regressors)
        self.variance_estimators = nn.ModuleList(estimators)
        self.pad_weight = pad_weight

    def default_layers(self, model: nn.Module) -> list[str]:
        # the authors' code (torchdistill's PAD-L2 configs) distills the pooled embedding ("avgpool")
        return embedding_layers(model)

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.pad_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.pad_weight:
            if self.training and len(images) < 2:
                raise KdError(
                    "method=pad predicts its variances through BatchNorm (as the authors' code does), "
                    "which needs at least 2 samples per training batch, got 1; raise trainer.batch_size"
                )
            terms["pad"] = self.pad_weight * tensor_sum(
                pair_loss(regress, estimate, s, t)
                for regress, estimate, s, t in zip(self.regressors, self.variance_estimators, student, teacher)
            )
        return logits, terms
