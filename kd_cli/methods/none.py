"""`method=none`: the student trained alone with its task loss, cross-entropy (per pixel for segmentation,
ignored pixels left out; a detector's own losses, each its own term): teacher training, and the baseline."""

from __future__ import annotations

from typing import Annotated

import torch

from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.registry import NonNegative, Range

# Label smoothing 1 would make every target uniform: nothing left to learn.
Smoothing = Annotated[float, Range(0, 1, high_open=True)]


@register_method("none")
class NoDistillation(Distiller):
    requires_teacher = False
    loss_weights = ("ce_weight",)
    tasks = ("classification", "segmentation", "detection")

    def __init__(self, student, teacher=None, *, ce_weight: NonNegative, label_smoothing: Smoothing):
        super().__init__(student, None)  # a teacher, if one is around, is ignored
        self.ce_weight = ce_weight
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        outputs, terms = self.task.supervised(self.student, images, labels, self.label_smoothing)
        return outputs, {name: self.ce_weight * term for name, term in terms.items()}
