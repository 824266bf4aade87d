"""Each model sees the same image in its own form: a teacher trained at another size, with another
normalisation or on RGB where the data is grey, gets the student's batch converted on the device.

The loader produces the student's form (the data set's size, mean and std). `feed_own_form` puts a
forward pre-hook on the teacher that undoes that normalisation (an exact affine inverse), repeats a
grey channel to RGB, resizes to the teacher's side (bilinear, antialiased when shrinking) and applies
the teacher's own mean and std. So there is one augmented view per sample, then each model's own
resize and normalisation. A teacher already in the data's form gets no hook at all (bit-identical to
feeding it directly). The hook works on whatever size it is given, so dry runs that feed the teacher
an input of its own shape (`kd_input_shape`) size its feature adapters as training will.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Form:
    """How a model wants its images: channels, square side, per-channel mean and std (of [0, 1] pixels)."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def same_as(self, other: Form) -> bool:
        return (
            (self.channels, self.size) == (other.channels, other.size)
            and _close(self.mean, other.mean, self.channels)
            and _close(self.std, other.std, self.channels)
        )

    def describe(self) -> str:
        return f"{self.channels}x{self.size}x{self.size}, mean {list(self.mean)}, std {list(self.std)}"


class ToOwnForm:
    """A forward pre-hook: images in the `source` form -> the same images in the `target` form."""

    def __init__(self, source: Form, target: Form):
        self.source, self.target = source, target

    def __repr__(self) -> str:  # no address: the teacher cache's key hashes the hooks' repr (teacher_identity)
        return f"ToOwnForm({self.source.describe()} -> {self.target.describe()})"

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        images, *rest = args
        return (self.convert(images), *rest)

    def convert(self, x: torch.Tensor) -> torch.Tensor:
        x = x * _stat(self.source.std, x) + _stat(self.source.mean, x)  # back to [0, 1] pixels
        if x.shape[1] == 1 and self.target.channels == 3:
            x = x.expand(-1, 3, -1, -1)  # a grey image is the same value in R, G and B
        size = self.target.size
        if x.shape[-2:] != (size, size):
            shrink = x.shape[-1] > size or x.shape[-2] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        return (x - _stat(self.target.mean, x)) / _stat(self.target.std, x)


def feed_own_form(model: nn.Module, data: Form, own: Form) -> ToOwnForm | None:
    """Make `model` (trained on images of form `own`) accept batches of form `data`; None when they agree."""
    if data.same_as(own):
        return None
    hook = ToOwnForm(data, own)
    model.register_forward_pre_hook(hook)
    return hook


def can_convert(data_channels: int, own_channels: int) -> bool:
    return data_channels == own_channels or (data_channels, own_channels) == (1, 3)


def _stat(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def _close(a: Sequence[float], b: Sequence[float], channels: int) -> bool:
    """Equal per channel, a single value standing for every channel."""
    a = list(a) * channels if len(a) == 1 else list(a)
    b = list(b) * channels if len(b) == 1 else list(b)
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))
