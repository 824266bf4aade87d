"""`method=reviewkd`: Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review" (CVPR 2021).

The student's levels are fused from deep to shallow by attention-based fusion (ABF) modules: each
level is reduced by a 1x1 conv, mixed with the (upsampled) fused result of the level below it
through two per-pixel attention maps, resized to the teacher's size at that level and mapped to
the teacher's channels by a 3x3 conv. Every fused level is compared with the teacher's feature at
the same level by the hierarchical context loss (HCL): MSE on the full map plus MSE of the maps
average-pooled to 4x4, 2x2 and 1x1 (only sizes smaller than the map), weighted 1, 1/2, 1/4, 1/8,
divided by the sum of the weights used, summed over levels (mdistiller's `hcl_loss`).

Levels: the deepest stages of `kd_feature_layers` (as many as the shallower of the two models
has), then the pooled embedding as a 1x1 map, as mdistiller does for CIFAR (student feats[1:] +
pooled feature). The pairing is in order, so unequal channels and sizes are handled by the ABFs.
Unlike mdistiller, the teacher's features are the stage modules' outputs (post-activation, what
a hook reads) rather than pre-activation maps, which most architectures do not expose as a module.
The term is weighted by min((epoch + 1) / warmup, 1): mdistiller's linear warm-up with 1-based epochs.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import embedding_layer, tensor_sum
from kd_cli.registry import NonNegative, NonNegativeInt, PositiveInt

HCL_POOL_SIZES = (4, 2, 1)


def hcl_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss summed over levels; the maps of each pair have the same shape."""
    return tensor_sum(level_hcl(at_least_fp32(s), at_least_fp32(t)) for s, t in zip(student, teacher, strict=True))


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses in float32 under bf16/fp16 autocast; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def level_hcl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for size in HCL_POOL_SIZES:
        if size >= min(student.shape[-2:]):  # only coarser than the map (mdistiller: maps are square)
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        total += weight
    return loss / total


class ABF(nn.Module):
    """Attention-based fusion of one student level with the fused level below it (if any)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        # two sigmoid maps: how much of this level and of the residual (deeper) level to keep per pixel
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        # the authors' initialisation (cast: indexing a Sequential is typed as any module)
        nn.init.kaiming_uniform_(cast(nn.Conv2d, self.reduce[0]).weight, a=1)
        nn.init.kaiming_uniform_(cast(nn.Conv2d, self.output[0]).weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output for the loss at the teacher's size, fused map passed on to the next shallower level)."""
        x = self.reduce(x)
        if self.attention is not None:
            assert residual is not None  # a fusing level always gets the deeper level's map
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            gates = self.attention(torch.cat([x, residual], dim=1))
            x = x * gates[:, :1] + residual * gates[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.output(x), x


def as_map(feature: torch.Tensor) -> torch.Tensor:
    """A pooled (N, C) embedding as an (N, C, 1, 1) map."""
    return feature[:, :, None, None] if feature.dim() == 2 else feature


def stage_layers(model: nn.Module) -> list[str]:
    layers = getattr(model, "kd_feature_layers", None)
    if layers is None:
        raise KdError(
            f"{type(model).__name__} was not built by kd's model registry; "
            "name its layers with method.student_layers / method.teacher_layers"
        )
    return list(layers)


def review_levels(model: nn.Module, stages: int) -> list[str]:
    """The deepest `stages` stage outputs, then the pooled embedding."""
    layers = stage_layers(model)
    return [*layers[max(0, len(layers) - stages) :], embedding_layer(model)]


def map_shapes(model: nn.Module, layers: list[str], shapes: list[tuple[int, ...]], role: str) -> list[tuple[int, ...]]:
    """(C, H, W) per level; only the last level (the embedding) may be a (C,) vector, taken as 1x1."""
    if len(layers) < 2:
        raise KdError(
            f"method=reviewkd needs at least one stage map and the embedding per model, but the "
            f"{role} has {layers}; use a model with convolutional stages or name them in "
            f"method.{role}_layers"
        )
    maps = []
    for i, (layer, shape) in enumerate(zip(layers, shapes)):
        if len(shape) == 1 and i == len(layers) - 1:
            shape = (shape[0], 1, 1)
        if len(shape) != 3:
            raise KdError(
                f"method=reviewkd needs feature maps (C,H,W) from the {role}'s stages, but "
                f"{type(model).__name__}'s '{layer}' gives {shape}; use a convolutional {role} "
                f"(e.g. {role}=cnn) or name map-producing modules in method.{role}_layers"
            )
        maps.append(tuple(shape))
    return maps


@register_method("reviewkd")
class ReviewKD(FeatureDistiller):
    loss_weights = ("reviewkd_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        reviewkd_weight: NonNegative,
        warmup: NonNegativeInt,
        max_mid_channels: PositiveInt,
        student_layers: list[str] | None,
        teacher_layers: list[str] | None,
        **common: Any,
    ):
        # Default levels: as many stages of each model as the shallower one has, paired deepest first.
        given = student_layers or teacher_layers
        stages = len(given) - 1 if given else min(len(stage_layers(student)), len(stage_layers(teacher)))
        super().__init__(
            student,
            teacher,
            student_layers=student_layers or review_levels(student, stages),
            teacher_layers=teacher_layers or review_levels(teacher, stages),
            **common,
        )
        self.reviewkd_weight, self.warmup = reviewkd_weight, warmup
        student_maps = map_shapes(student, self.student_layers, self.student_shapes, "student")
        teacher_maps = map_shapes(teacher, self.teacher_layers, self.teacher_shapes, "teacher")
        self.out_sizes = [shape[1:] for shape in teacher_maps]
        mid = min(max_mid_channels, student_maps[-1][0])  # mdistiller: min(512, channels of the deepest level)
        # shallow to deep, as the layers; the deepest has nothing below it to fuse with. None at all when
        # the term is left out (DDP: every parameter must get a gradient)
        self.abfs = nn.ModuleList(
            ABF(s[0], mid, t[0], fuse=i < len(student_maps) - 1)
            for i, (s, t) in enumerate(zip(student_maps, teacher_maps))
            if reviewkd_weight
        )

    @classmethod
    def validate_options(
        cls, *, student_layers: list[str] | None = None, teacher_layers: list[str] | None = None, **options
    ) -> None:
        """Given layer lists: at least one stage map then the embedding, as many for both models."""
        for role, layers in (("student", student_layers), ("teacher", teacher_layers)):
            if layers and len(layers) < 2:
                raise KdError(
                    f"method=reviewkd needs at least one stage map and the embedding per model, but "
                    f"method.{role}_layers names {layers}; name the stage modules then the embedding, "
                    f"or null for the default levels"
                )
        super().validate_options(student_layers=student_layers, teacher_layers=teacher_layers, **options)

    def warmup_factor(self) -> float:
        return min((self.epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0

    def review(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fuse deep to shallow; return the outputs shallow to deep (aligned with the teacher's levels)."""
        outputs, residual = [], None
        for feature, abf, size in zip(reversed(features), reversed(self.abfs), reversed(self.out_sizes)):
            output, residual = abf(as_map(feature), residual, size)
            outputs.append(output)
        return outputs[::-1]

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        if self.training and self.reviewkd_weight and images.shape[0] < 2:
            raise KdError(
                "method=reviewkd needs training batches of at least 2 (its fusion modules use "
                "batch norm on 1x1 maps); raise trainer.batch_size"
            )
        logits, student_features, teacher_logits, teacher_features = self.features(images, self.reviewkd_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.reviewkd_weight:
            fused = self.review(student_features)
            loss = hcl_loss(fused, [as_map(f) for f in teacher_features])
            terms["reviewkd"] = self.reviewkd_weight * self.warmup_factor() * loss
        return logits, terms
