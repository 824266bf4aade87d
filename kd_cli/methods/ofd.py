"""`method=ofd`: Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019), as the authors'
CIFAR-100 code (clovaai/overhaul-distillation) and mdistiller's OFD run it.

Both models' features are read before the ReLU that closes each stage (`PreActivationTap`). The teacher's
are clipped from below by a margin per channel m_c = E[x | x < 0] for x ~ N(beta_c, gamma_c^2), gamma and
beta those of the teacher's BatchNorm before that ReLU:

    m_c = beta - |gamma| phi(beta/|gamma|) / Phi(-beta/|gamma|)     (-3 |gamma| when Phi(-beta/|gamma|) <= 0.001)

The student's pre-activation goes through a connector (1x1 conv without bias + BatchNorm) into the
teacher's channels, and the partial L2 distance to t' = max(t, m) skips the positions where the student is
already below a target that is not positive (the teacher's ReLU would zero both):

    d(s, t') = sum over (c, h, w) of (s - t')^2 * [s > t' or t' > 0],   averaged over the batch
    ofd = sum over the stages i = 1..n of d_i / 2^(n - i)                 (the deepest stage weighs 1)

weighted by ofd_weight (mdistiller's FEAT_WEIGHT 1e-3, the authors' `loss_distill.sum() / batch_size / 1000`)
beside the cross-entropy. Unequal grids: the larger map is average-pooled to the smaller one's grid.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import full_precision, input_shape, match_spatial, tensor_sum
from kd_cli.models.features import (
    PreActivation,
    PreActivationTap,
    preactivation_sites,
    resolve_modules,
)
from kd_cli.registry import NonNegative

# Below this probability of a negative response the conditional mean is numerically meaningless; the
# reference takes -3 sigma instead.
TAIL = 1e-3


def ofd_margin(weight: torch.Tensor | None, bias: torch.Tensor | None, channels: int) -> torch.Tensor:
    """The per-channel margin E[x | x < 0], x ~ N(bias, weight^2), computed in float64 (a BatchNorm
    without affine parameters is N(0, 1)). A channel with weight 0 is the constant `bias`: its negative
    responses, if any, are `bias` itself, and it has none (margin 0) otherwise."""
    gamma = torch.ones(channels, dtype=torch.float64) if weight is None else weight.detach().double().cpu()
    beta = torch.zeros(channels, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    sigma = gamma.abs()
    z = beta / sigma.clamp_min(1e-300)
    below = 0.5 * torch.erfc(z / math.sqrt(2))  # Phi(-z), accurate in the far tail too
    density = torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(below > TAIL, beta - sigma * density / below.clamp_min(TAIL), -3 * sigma)
    return torch.where(sigma == 0, beta.clamp_max(0), margin)


def partial_l2(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """sum over (C, H, W) of (s - t')^2 [s > t' or t' > 0], t' = max(t, margin), averaged over the batch."""
    student, teacher = full_precision(student), full_precision(teacher)
    target = torch.maximum(teacher, margin.to(teacher.dtype).view(1, -1, 1, 1))
    keep = (student > target) | (target > 0)
    return ((student - target).pow(2) * keep).sum() / student.shape[0]


def stage_weights(count: int) -> list[float]:
    """1 / 2^(n - i) for the stages i = 1..n, shallow to deep (the authors' and AB's)."""
    return [2.0 ** (i - count + 1) for i in range(count)]


def ofd_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], margins: list[torch.Tensor]) -> torch.Tensor:
    """The stages' partial L2 distances, the deepest weighing 1, each shallower one half the next."""
    return tensor_sum(
        w * partial_l2(s, t, m) for w, s, t, m in zip(stage_weights(len(student)), student, teacher, margins)
    )


def connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """1x1 conv (no bias) + BatchNorm into the teacher's channels; He-normal over the output fan, BN at
    identity (the authors' build_feature_connector)."""
    conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(teacher_channels))


class PreReluDistiller(FeatureDistiller):
    """A feature method on the stages' pre-ReLU features (OFD, AB): FeatureDistiller with pre-activation
    taps instead of the stage outputs. Feature maps only; the teacher cache does not serve it (it stores
    stage outputs, not pre-activations)."""

    def __init__(self, student, teacher, **common: Any):
        super().__init__(student, teacher, **common)
        self.require_maps()
        self.student_sites = self._sites(student, self.student_layers, "student")
        self.teacher_sites = self._sites(teacher, self.teacher_layers, "teacher")

    def _sites(self, model: nn.Module, layers: list[str], role: str) -> list[PreActivation]:
        channels, size, _ = input_shape(model)
        return preactivation_sites(
            model,
            layers,
            channels,
            size,
            who=f"method={self.method_name} ({role})",
            fix=f"name such layers with method.{role}_layers or pick another {role}",
        )

    def student_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with PreActivationTap(self.student, self.student_sites) as tap:
            logits = self.student(images)
        return logits, [tap.outputs[site.layer] for site in self.student_sites]

    def _teacher_pass(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with PreActivationTap(self.teacher, self.teacher_sites, detach=True) as tap:
            logits = self.teacher(images)
        return (logits, *(tap.outputs[site.layer] for site in self.teacher_sites))

    def teacher_cache_outputs(self) -> list[str] | None:
        return None

    def connected(
        self, connectors: nn.ModuleList, student: list[torch.Tensor], teacher: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each pair on the smaller grid, the student's through its connector into the teacher's channels."""
        pairs = [match_spatial(s, t) for s, t in zip(student, teacher)]
        return [c(s) for c, (s, _) in zip(connectors, pairs)], [t for _, t in pairs]


@register_method("ofd")
class OverhaulFeatureDistillation(PreReluDistiller):
    loss_weights = ("ofd_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        ofd_weight: NonNegative,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        self.ofd_weight = ofd_weight
        self.connectors = None
        if not ofd_weight:  # no connectors or margins for a term left out (DDP: every parameter needs a gradient)
            return
        norms = resolve_modules(teacher, [site.norm for site in self.teacher_sites if site.norm])
        for i, (site, shape) in enumerate(zip(self.teacher_sites, self.teacher_shapes)):
            # cast: a site's norm is a BatchNorm (preactivation_sites records no other kind)
            norm = cast("_BatchNorm | None", norms.get(site.norm) if site.norm else None)
            if norm is None or norm.num_features != shape[0]:
                raise KdError(
                    f"method=ofd takes its margins from the BatchNorm before each teacher ReLU, but no "
                    f"BatchNorm of {shape[0]} channels runs before '{site.relu}' in teacher layer "
                    f"'{site.layer}'; pick teacher layers that end in BatchNorm + ReLU "
                    f"(method.teacher_layers)"
                )
            self.register_buffer(f"margin{i}", ofd_margin(norm.weight, norm.bias, shape[0]).float())
        self.connectors = nn.ModuleList(connector(s[0], t[0]) for s, t in zip(self.student_shapes, self.teacher_shapes))

    @property
    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.teacher_sites))]

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.ofd_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.ofd_weight:
            assert self.connectors is not None  # built whenever ofd_weight > 0
            student, teacher = self.connected(self.connectors, student, teacher)
            terms["ofd"] = self.ofd_weight * ofd_loss(student, teacher, self.margins)
        return logits, terms
