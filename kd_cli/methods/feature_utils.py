"""Helpers shared by the feature methods: shape checks, spatial matching, the student regressor.

Shapes are per sample, as `FeatureDistiller` finds them: (C, H, W) for a feature map, (D,) for
a vector (an MLP layer, a pooled embedding).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError

Shape = Sequence[int]


def feature_layers(model: nn.Module) -> list[str]:
    """The model's stage outputs, shallow to deep, as its builder recorded them (`set_feature_layers`).
    (cast: nn.Module's stubs type any other attribute as a tensor or a module.)"""
    return cast("list[str]", _recorded(model, "kd_feature_layers"))


def embedding_layer(model: nn.Module) -> str:
    """The model's pooled embedding before the classifier, as its builder recorded it."""
    return cast(str, _recorded(model, "kd_embedding_layer"))


def _recorded(model: nn.Module, attribute: str) -> object:
    """What the model registry recorded on a network; a network rebuilt as a graph (an int8 model from kd
    compress) has lost its layer names: one line instead of an AttributeError."""
    if not hasattr(model, attribute):
        raise KdError(
            f"a {type(model).__name__} has no layers a feature method can read (an int8 model from kd compress "
            "is a converted graph); use the uncompressed model, or a method that reads logits only (kd, dkd, dist)"
        )
    return getattr(model, attribute)


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """The (C, H, W) input the model registry recorded for the model (`kd_input_shape`)."""
    return cast("tuple[int, int, int]", model.kd_input_shape)


def is_map(shape: Shape) -> bool:
    return len(shape) == 3


def is_vector(shape: Shape) -> bool:
    return len(shape) == 1


def require_maps(method: str, role: str, layer: str, shape: Shape) -> None:
    """Methods on spatial attention need (C, H, W) features."""
    if not is_map(shape):
        raise KdError(
            f"method {method} needs feature maps (C,H,W) but {role} layer '{layer}' gives shape {tuple(shape)}; "
            f"use a convolutional {role} (e.g. {role}=cnn) or set method.{role}_layers to conv stages"
        )


def require_same_kind(method: str, student: tuple[str, Shape], teacher: tuple[str, Shape]) -> None:
    """A regressor maps a map onto a map or a vector onto a vector, not one onto the other."""
    (s_layer, s_shape), (t_layer, t_shape) = student, teacher
    if (is_map(s_shape) and is_map(t_shape)) or (is_vector(s_shape) and is_vector(t_shape)):
        return
    raise KdError(
        f"method {method} cannot pair student layer '{s_layer}' {tuple(s_shape)} with teacher layer "
        f"'{t_layer}' {tuple(t_shape)}; pair two feature maps (C,H,W) or two vectors (D,) through "
        f"method.student_layers / method.teacher_layers (e.g. student=cnn for a CNN teacher's stages)"
    )


def matched_size(student: Shape, teacher: Shape) -> tuple[int, int]:
    """The grid both maps are compared on: the smaller of the two in each direction."""
    return min(student[1], teacher[1]), min(student[2], teacher[2])


def pool_to(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool a (B, C, H, W) map down to `size`; a map already that size is returned as is."""
    if tuple(features.shape[2:]) == tuple(size):
        return features
    return F.adaptive_avg_pool2d(features, size)


def match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the larger map to the smaller one's grid (RepDistiller's AT and VID do the same);
    vectors pass through unchanged."""
    if student.dim() != 4:
        return student, teacher
    size = matched_size(student.shape[1:], teacher.shape[1:])
    return pool_to(student, size), pool_to(teacher, size)


def area_scale(model: nn.Module, tuned_input_size: int | None) -> float:
    """The factor that carries a weight tuned at `tuned_input_size`² inputs (32 for the CIFAR recipes) to
    this model's inputs, for terms that scale as 1 / (map positions) (AT's and NST's: unit-norm maps or
    channels compared position by position): this input's area over the tuned one's. 1 when None (the
    published form, unchanged)."""
    if tuned_input_size is None:
        return 1.0
    _, height, width = input_shape(model)
    return height * width / tuned_input_size**2


def check_relation_batch(method: str, batch: int) -> None:
    """Relational losses compare the samples of a batch with each other: one sample has no relation."""
    if batch < 2:
        raise KdError(
            f"method {method} compares the samples of a batch with each other and needs at least 2 per batch, "
            f"got {batch}; raise trainer.batch_size"
        )


def tensor_sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The built-in sum() of loss terms, typed as the tensor it is: sum() starts from the int 0, so its
    stub also allows 0 (what an empty iterable gives); callers sum one term per layer, at least one."""
    return cast(torch.Tensor, sum(terms))


def full_precision(features: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 (autocast) features to float32: the losses divide and normalise; float64 stays."""
    return features.float() if features.dtype in (torch.float16, torch.bfloat16) else features


def sample_vectors(features: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, D) at full precision, for the losses on sample relations."""
    return full_precision(features.flatten(1))


class Regressor(nn.Module):
    """Maps student features onto the teacher's shape (FitNet's regressor, CC's embedding).

    Maps: both are average-pooled to the smaller grid (so any ratio of sizes works, without
    RepDistiller's strided or transposed convolutions), then a 1x1 conv to the teacher's channels
    and BatchNorm (RepDistiller's ConvReg at equal sizes), and a ReLU when `relu`. Vectors: a
    linear layer (+ ReLU); no BatchNorm, which would fail on a batch of one.
    `forward(student, teacher)` returns both, ready to compare.
    """

    def __init__(self, student_shape: Shape, teacher_shape: Shape, relu: bool):
        super().__init__()
        if is_map(student_shape):
            self.size: tuple[int, int] | None = matched_size(student_shape, teacher_shape)
            channels = teacher_shape[0]
            layers: list[nn.Module] = [nn.Conv2d(student_shape[0], channels, 1), nn.BatchNorm2d(channels)]
        else:
            self.size = None
            layers = [nn.Linear(student_shape[0], teacher_shape[0])]
        self.net = nn.Sequential(*layers, *([nn.ReLU()] if relu else []))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size is not None:
            student, teacher = pool_to(student, self.size), pool_to(teacher, self.size)
        return self.net(student), teacher
