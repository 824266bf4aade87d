"""`method=ensemble`: distil several teachers into one student ("model fusion").

The teachers' softened outputs are averaged with weights, p = sum_i w_i softmax(z_i / T), and the
student is trained with Hinton's KD against p (Hinton et al. 2015 distil an ensemble the same way).
Passing T * log(p) as the ensemble's "logits" to `kd_loss` gives exactly KL(p || softmax(s / T)),
since softmax(T log p / T) = p.

The teachers come from `method.teachers` (run directories or model.safetensors files), not from
`teacher.checkpoint`; they are held as plain attributes like any teacher: frozen, in eval mode,
never saved with the student.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.methods.feature_utils import tensor_sum
from kd_cli.methods.logit_utils import kd_loss
from kd_cli.registry import NonNegative, Temperature


def ensemble_probabilities(logits: list[torch.Tensor], weights: list[float], temperature: float) -> torch.Tensor:
    """sum_i w_i softmax(z_i / T), with weights summing to one."""
    return tensor_sum(w * F.softmax(z.float() / temperature, dim=1) for w, z in zip(weights, logits))


def check_weights(weights: list[float] | None, count: int) -> None:
    """null (equal weights) or one non-negative weight per teacher, not all zero."""
    if weights and (len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0):
        raise KdError(
            f"method.weights={list(weights)} must be {count} non-negative numbers, one per teacher "
            f"(method.teachers), not all zero; or null for equal weights"
        )


def normalised_weights(weights: list[float] | None, count: int) -> list[float]:
    check_weights(weights, count)
    weights = [1.0] * count if not weights else [float(w) for w in weights]
    return [w / sum(weights) for w in weights]


@register_method("ensemble")
class Ensemble(Distiller):
    requires_teacher = False  # its teachers are method.teachers
    loss_weights = ("kd_weight", "ce_weight")
    teachers: list[nn.Module]  # a plain attribute, set through __dict__ (not submodules)

    def __init__(
        self,
        student,
        teacher=None,
        *,
        load_model: Callable[[str], tuple[nn.Module, Any]],
        teachers: list[str],
        weights: list[float] | None,
        temperature: Temperature,
        kd_weight: NonNegative,
        ce_weight: NonNegative,
    ):
        super().__init__(student, None)
        models = [self._load_teacher(load_model, path, student) for path in teachers]
        self.__dict__["teachers"] = models  # plain attribute: not submodules (see Distiller)
        self.weights = normalised_weights(weights, len(models))
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight

    @classmethod
    def validate_options(cls, **options: Any) -> None:
        # Taken from **options (the registry passes every option) so the signature stays the base's.
        teachers: list[str] = options.pop("teachers")
        weights: list[float] | None = options.pop("weights")
        if not teachers:
            raise KdError("method=ensemble needs method.teachers=[RUN_DIR,RUN_DIR,...] (one or more teachers)")
        check_weights(weights, len(teachers))
        super().validate_options(**options)

    @staticmethod
    def _load_teacher(load_model: Callable[[str], tuple[nn.Module, Any]], path: str, student) -> nn.Module:
        """A saved teacher (through the stage's loader, which reads kd's model files), checked against the data."""
        model, spec = load_model(path)
        expected = getattr(student, "kd_input_shape", None)
        if expected and (spec.in_channels, spec.input_size) != (expected[0], expected[1]):
            raise KdError(
                f"teacher {path} takes {spec.in_channels}x{spec.input_size}px images but this data set "
                f"has {expected[0]}x{expected[1]}px; give teachers trained on this data set"
            )
        return model.requires_grad_(False)

    @torch.no_grad()
    def ensemble_logits(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for model in self.teachers:
            model.to(images.device).eval()  # a no-op after the first batch
            outputs.append(model(images))
        probabilities = ensemble_probabilities(outputs, self.weights, self.temperature)
        return self.temperature * probabilities.clamp_min(1e-12).log()

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        terms = {}
        if self.kd_weight:  # a term whose weight is 0 is left out (and the teachers not run for it)
            ensemble = self.ensemble_logits(images)
            if ensemble.shape != logits.shape:
                raise KdError(
                    f"the teachers predict {ensemble.shape[1]} classes but the student "
                    f"{logits.shape[1]}; give teachers trained on this data set"
                )
            terms["kd"] = self.kd_weight * kd_loss(logits.float(), ensemble, self.temperature)
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(logits, labels)
        return logits, terms
