"""Small building blocks, option types and shape checks shared by the model families."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from kd_cli.errors import KdError
from kd_cli.registry import Range

# A dropout probability: 1 would drop everything (torch itself accepts it, and trains nothing).
DropoutRate = Annotated[float, Range(0, 1, high_open=True)]


class GlobalAvgPool(nn.Module):
    """Average over all spatial positions and flatten to (N, C).

    Adaptive (not a fixed 8x8 or 4x4 window as in the original CIFAR code) so the same net runs
    on 32x32 CIFAR, 28x28 MNIST and 8x8 digits; being a module, its output is the embedding that
    feature-distillation methods hook.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=bias)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, groups=groups, bias=False)


def conv_bn_relu(in_planes: int, out_planes: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(in_planes, out_planes, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_planes), nn.ReLU())


def kaiming_init(model: nn.Module) -> None:
    """He init for convs, BN at identity, zero biases: the init the CIFAR KD zoo trains from."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


def check_io(arch: str, num_classes: int, in_channels: int, input_size: int, min_size: int = 1) -> None:
    """Reject shapes no model can be built for, naming the fix."""
    if int(num_classes) < 1:
        raise KdError(f"model '{arch}': num_classes must be >= 1, got {num_classes}; check the dataset config")
    if int(in_channels) < 1:
        raise KdError(f"model '{arch}': in_channels must be >= 1, got {in_channels}; check the dataset config")
    if int(input_size) < min_size:
        raise KdError(
            f"model '{arch}' needs inputs of at least {min_size}x{min_size} pixels, got {input_size}; "
            f"resize the data or choose another model"
        )
