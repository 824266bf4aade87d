"""`method=pkt`: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
Transfer" (ECCV 2018).

Each network's embeddings give a cosine-similarity kernel K = (cos + 1) / 2 between the samples
of a batch; normalising each row gives the conditional distribution over the batch for that
sample, and the loss is KL(teacher || student) of those distributions. As in RepDistiller (whose
beta=30000 is tuned for it), the sample itself is part of its own distribution (the paper leaves
it out) and the KL is averaged over all b x b entries. Student and teacher dimensions may differ.
A batch of one has no relations: KdError.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller, embedding_layers
from kd_cli.methods.feature_utils import check_relation_batch, sample_vectors, tensor_sum
from kd_cli.registry import NonNegative

EPS = 1e-7  # RepDistiller's: keeps the norm division and the log finite


def conditional_probabilities(features: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B): row i is the distribution over the batch given sample i."""
    unit = features / (features.norm(dim=1, keepdim=True) + EPS)
    kernel = (unit @ unit.T + 1) / 2  # cosine similarity moved to [0, 1]
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the b x b entries of p_t * log(p_t / p_s)."""
    check_relation_batch("pkt", len(student))
    p_s = conditional_probabilities(sample_vectors(student))
    p_t = conditional_probabilities(sample_vectors(teacher))
    return (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()


@register_method("pkt")
class PKT(FeatureDistiller):
    loss_weights = ("pkt_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        pkt_weight: NonNegative,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        self.pkt_weight = pkt_weight

    def default_layers(self, model: nn.Module) -> list[str]:
        return embedding_layers(model)  # RepDistiller's feat[-1]: the pooled embedding

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.pkt_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.pkt_weight:
            terms["pkt"] = self.pkt_weight * tensor_sum(pkt_loss(s, t) for s, t in zip(student, teacher))
        return logits, terms
