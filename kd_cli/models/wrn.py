"""Wide ResNets (Zagoruyko & Komodakis 2016) as used in the KD literature: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

WRN-d-k: a 3x3 stem of 16 channels, three stages of (d-4)/6 pre-activation blocks
(BN-ReLU-conv3x3, BN-ReLU-[dropout]-conv3x3) of widths 16k, 32k, 64k, the last two halving the
resolution, then BN-ReLU, global pooling and a linear classifier. A 1x1 conv shortcut, fed by the
pre-activated input, wherever the shape changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kd_cli.models.blocks import (
    DropoutRate,
    GlobalAvgPool,
    check_io,
    conv1x1,
    conv3x3,
    kaiming_init,
)
from kd_cli.models.features import set_feature_layers
from kd_cli.models.registry import register_model


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = conv1x1(in_planes, planes, stride) if stride != 1 or in_planes != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        # the projection sees the pre-activated input; an identity shortcut keeps the raw input
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + residual


def make_stage(in_planes: int, planes: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
    layers = []
    for s in [stride] + [1] * (blocks - 1):
        layers.append(PreActBlock(in_planes, planes, s, dropout))
        in_planes = planes
    return nn.Sequential(*layers)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int, dropout: float):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n+4"
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = conv3x3(in_channels, widths[0])
        self.block1 = make_stage(widths[0], widths[1], n, 1, dropout)
        self.block2 = make_stage(widths[1], widths[2], n, 2, dropout)
        self.block3 = make_stage(widths[2], widths[3], n, 2, dropout)
        # pre-activation blocks leave the last stage un-normalised: this BN-ReLU closes it, and
        # its output is the last stage's feature (as RepDistiller's f3)
        self.head_act = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU())
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(widths[3], num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.pool(self.head_act(x)))


WRNS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}


def _builder(name: str, depth: int, widen: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, input_size: int, dropout: DropoutRate = 0.0) -> nn.Module:
        check_io(name, num_classes, in_channels, input_size)
        model = WideResNet(depth, widen, num_classes, in_channels, dropout)
        return set_feature_layers(model, ["block1", "block2", "head_act"], "pool")

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"WRN-{depth}-{widen}; `dropout` between the two convs of each block."
    return build


for _name, (_depth, _widen) in WRNS.items():
    register_model(_name)(_builder(_name, _depth, _widen))
