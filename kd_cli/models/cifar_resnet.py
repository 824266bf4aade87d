"""CIFAR ResNets as used in the KD literature (CRD / RepDistiller): resnet8 ... resnet110, resnet8x4, resnet32x4.

He et al. 2016, section 4.2: a 3x3 stem, then three stages of n basic blocks each (depth = 6n + 2),
the second and third halving the resolution. The "x4" variants widen the stem and stages to
32 / 64 / 128 / 256 channels, as RepDistiller defines them (1.23 M and 7.43 M parameters at 100
classes). Projection shortcuts (1x1 conv + BN) wherever the shape changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from kd_cli.models.blocks import GlobalAvgPool, check_io, conv1x1, conv3x3, kaiming_init
from kd_cli.models.features import set_feature_layers
from kd_cli.models.registry import register_model


class BasicBlock(nn.Module):
    """conv-bn-relu, conv-bn, add the shortcut, relu."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    strides = [stride] + [1] * (blocks - 1)
    layers = []
    for s in strides:
        layers.append(BasicBlock(in_planes, planes, s))
        in_planes = planes
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths: Sequence[int], num_classes: int, in_channels: int):
        super().__init__()
        assert (depth - 2) % 6 == 0, "CIFAR ResNet depth must be 6n+2"
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = make_stage(widths[0], widths[1], n, stride=1)
        self.layer2 = make_stage(widths[1], widths[2], n, stride=2)
        self.layer3 = make_stage(widths[2], widths[3], n, stride=2)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(widths[3], num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))


NARROW = (16, 16, 32, 64)
WIDE_X4 = (32, 64, 128, 256)
# name -> (depth, stem and stage widths)
CIFAR_RESNETS = {
    "resnet8": (8, NARROW),
    "resnet14": (14, NARROW),
    "resnet20": (20, NARROW),
    "resnet32": (32, NARROW),
    "resnet44": (44, NARROW),
    "resnet56": (56, NARROW),
    "resnet110": (110, NARROW),
    "resnet8x4": (8, WIDE_X4),
    "resnet32x4": (32, WIDE_X4),
}


def _builder(name: str, depth: int, widths: Sequence[int]) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        check_io(name, num_classes, in_channels, input_size)
        model = CifarResNet(depth, widths, num_classes, in_channels)
        return set_feature_layers(model, ["layer1", "layer2", "layer3"], "pool")

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"CIFAR ResNet-{depth}, widths {'/'.join(map(str, widths))} (RepDistiller)."
    return build


for _name, (_depth, _widths) in CIFAR_RESNETS.items():
    register_model(_name)(_builder(_name, _depth, _widths))
