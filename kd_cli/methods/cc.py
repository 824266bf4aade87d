"""`method=cc`: Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019).

The correlation between two samples is a Gaussian RBF kernel on L2-normalised embeddings,
exp(-gamma ||a - b||^2) = exp(-2 gamma) exp(2 gamma a.b), approximated by its Taylor expansion
to order P: sum_p exp(-2 gamma) (2 gamma)^p / p! (a.b)^p (the paper's equation 8). The loss is
the mean squared difference of the student's and teacher's b x b correlation matrices (the
paper's 1/n^2 ||.||^2). gamma=0.4, P=2 and the weight 100 follow AberHu's Knowledge-Distillation-Zoo,
whose CC is this formula (RepDistiller's 0.02 belongs to another one, emailed code on |f_s - f_t|,
under which this loss would barely act). `kernel=bilinear` takes the paper's other kernel, the
bilinear pool a.b, on the same unit-norm embeddings. When the student's embedding does not have the
teacher's shape, a learnable linear embedding (a 1x1 conv + BN for maps) maps it onto it first.
A batch of one has no relations: KdError.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller, embedding_layers
from kd_cli.methods.feature_utils import (
    Regressor,
    check_relation_batch,
    require_same_kind,
    sample_vectors,
    tensor_sum,
)
from kd_cli.registry import NonNegative, NonNegativeInt, Positive


def correlation_matrix(features: torch.Tensor, gamma: float, order: int, kernel: str = "gaussian") -> torch.Tensor:
    """(B, ...) -> (B, B): the order-P Taylor expansion of the RBF kernel on unit-norm features, or
    (`bilinear`) their plain dot products."""
    unit = F.normalize(sample_vectors(features), dim=1)
    similarity = unit @ unit.T
    if kernel == "bilinear":
        return similarity
    scale = math.exp(-2 * gamma)
    return tensor_sum(scale * (2 * gamma) ** p / math.factorial(p) * similarity.pow(p) for p in range(order + 1))


def cc_loss(
    student: torch.Tensor, teacher: torch.Tensor, gamma: float, order: int, kernel: str = "gaussian"
) -> torch.Tensor:
    check_relation_batch("cc", len(student))
    return F.mse_loss(
        correlation_matrix(student, gamma, order, kernel), correlation_matrix(teacher, gamma, order, kernel)
    )


@register_method("cc")
class CorrelationCongruence(FeatureDistiller):
    loss_weights = ("cc_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        cc_weight: NonNegative,
        gamma: Positive,
        order: NonNegativeInt,
        kernel: Literal["gaussian", "bilinear"],
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        # no adapter for a term left out (DDP: every parameter must get a gradient)
        # (None entries are real: ModuleList keeps them, for pairs that need no embedding; its stub allows modules only)
        pairs = zip(self.student_layers, self.student_shapes, self.teacher_layers, self.teacher_shapes)
        self.embeds = nn.ModuleList(self._embed(*pair) for pair in pairs if cc_weight)  # type: ignore[misc]
        self.cc_weight, self.gamma, self.order, self.kernel = cc_weight, gamma, order, kernel

    @staticmethod
    def _embed(s_layer, s_shape, t_layer, t_shape) -> nn.Module | None:
        if tuple(s_shape) == tuple(t_shape):
            return None  # already comparable: nothing to learn
        require_same_kind("cc", (s_layer, s_shape), (t_layer, t_shape))
        return Regressor(s_shape, t_shape, relu=False)

    def default_layers(self, model: nn.Module) -> list[str]:
        return embedding_layers(model)  # RepDistiller's feat[-1]: the pooled embedding

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.cc_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.cc_weight:
            pairs = (embed(s, t) if embed is not None else (s, t) for embed, s, t in zip(self.embeds, student, teacher))
            loss = tensor_sum(cc_loss(s, t, self.gamma, self.order, self.kernel) for s, t in pairs)
            terms["cc"] = self.cc_weight * loss
        return logits, terms
