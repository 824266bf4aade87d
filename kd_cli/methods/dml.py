"""`method=dml`: Zhang et al., "Deep Mutual Learning" (CVPR 2018): online distillation, no teacher.

A cohort of K students (`students`: the run's student and K - 1 peers of its architecture, each
newly initialised) learns together. Student k's loss is its cross-entropy plus the mean over the
other students l of KL(p_l || p_k) (the paper's eq. 9-10), each other student's prediction taken as
a fixed target; p at `temperature` (1 in the paper), times T^2 as in KD so the scale does not
depend on it. The paper updates the students in turn, one forward pass per update; here every
student is updated from the same forward pass of the batch (AberHu's Knowledge-Distillation-Zoo
does the same: K forward passes per batch instead of K^2).

Each peer is evaluated beside the student every evaluation epoch (`peer1_test_top1`, ...) and saved
as its own model in the run (`peers/peer1`), which `kd evaluate run=RUN/peers/peer1` scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.methods.feature_utils import full_precision, tensor_sum
from kd_cli.methods.logit_utils import kd_loss
from kd_cli.registry import NonNegative, Range, Temperature

CohortSize = Annotated[int, Range(2, 16)]  # one student alone has no one to learn from; 16 train at once


def mutual_loss(own: torch.Tensor, others: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over the other students of T^2 KL(p_other || p_own), the others' outputs as fixed targets."""
    own = full_precision(own)
    return tensor_sum(kd_loss(own, full_precision(other.detach()), temperature) for other in others) / len(others)


@register_method("dml")
class DeepMutualLearning(Distiller):
    requires_teacher = False  # the students teach each other
    loss_weights = ("ce_weight", "dml_weight")

    def __init__(
        self,
        student,
        teacher=None,
        *,
        new_student: Callable[[], nn.Module],
        students: CohortSize,
        ce_weight: NonNegative,
        dml_weight: NonNegative,
        temperature: Temperature,
    ):
        super().__init__(student, None)  # a teacher, if one is around, is ignored
        self.peers = nn.ModuleList(new_student() for _ in range(students - 1))
        self.ce_weight, self.dml_weight, self.temperature = ce_weight, dml_weight, temperature

    def peer_models(self) -> dict[str, nn.Module]:
        return {f"peer{k}": peer for k, peer in enumerate(self.peers, 1)}

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        cohort = [self.student(images), *(peer(images) for peer in self.peers)]
        prefixes = ["", *(f"{name}_" for name in self.peer_models())]  # the student's terms keep plain names
        terms = {}
        for k, (prefix, own) in enumerate(zip(prefixes, cohort)):
            if self.ce_weight:
                terms[f"{prefix}ce"] = self.ce_weight * F.cross_entropy(own, labels)
            if self.dml_weight:
                others = [logits for other, logits in enumerate(cohort) if other != k]
                terms[f"{prefix}dml"] = self.dml_weight * mutual_loss(own, others, self.temperature)
        return cohort[0], terms
