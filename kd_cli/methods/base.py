"""The small base class every distillation method derives from (mdistiller's `Distiller` shape).

A method is an nn.Module that owns the student and any learnable adapters; it receives the
teacher but does not register it as a submodule, so the teacher is never optimised, never saved
with the student, and never part of the resume state (it is reloaded from its own weights).
`forward(images, labels)` returns the student's logits and a dict of named, already weighted
loss terms; the engine sums the terms and logs each one.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

import torch
from torch import nn


class Distiller(nn.Module, metaclass=ABCMeta):
    requires_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None):
        super().__init__()
        self.student = student
        self.__dict__["teacher"] = teacher  # plain attribute: not a submodule (see module docstring)
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher's BN statistics and dropout stay frozen
        return self

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)

    @abstractmethod
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's logits and the named, weighted loss terms for one batch."""

    def extra_state(self) -> dict[str, Any]:
        """Learnable state beyond the student (adapters, memory banks): saved for resume only."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}
