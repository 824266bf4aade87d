"""ShuffleNetV1 (Zhang et al. 2018) for CIFAR as used in the KD literature (CRD / RepDistiller), g = 3.

Bottleneck units: grouped 1x1 conv - channel shuffle - 3x3 depthwise - grouped 1x1 conv. A
stride-2 unit concatenates a 3x3 average-pooled shortcut (so its branch produces out - in
channels); a stride-1 unit adds an identity shortcut. Three stages of 4, 8, 4 units at 240, 480, 960
channels, after a 1x1 stem of 24 channels (CIFAR: no stride-2 stem, no max-pool).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_cli.models.blocks import GlobalAvgPool, check_io
from kd_cli.models.features import set_feature_layers
from kd_cli.models.registry import register_model

STEM_CHANNELS = 24
STAGE_CHANNELS = (240, 480, 960)
STAGE_UNITS = (4, 8, 4)
GROUPS = 3


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of the groups so the next grouped conv mixes information across them."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        branch_out = out_planes - in_planes if stride == 2 else out_planes
        mid = branch_out // 4
        # the first unit's input (the 24-channel stem) is too narrow to split into groups (paper, 3.3)
        self.groups_in = 1 if in_planes == STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.groups_in, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.groups_in)
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = self.shortcut(x)
        out = torch.cat([out, residual], 1) if self.stride == 2 else out + residual
        return self.relu(out)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU()
        c_in = STEM_CHANNELS
        stages = []
        for c_out, units in zip(STAGE_CHANNELS, STAGE_UNITS):
            layers = []
            for i in range(units):
                layers.append(ShuffleUnit(c_in, c_out, 2 if i == 0 else 1, GROUPS))
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = GlobalAvgPool()
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.pool(x))


@register_model("shufflenetv1")
def shufflenetv1(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """RepDistiller's ShuffleV1 (groups 3, widths 240/480/960)."""
    check_io("shufflenetv1", num_classes, in_channels, input_size)
    model = ShuffleNetV1(num_classes, in_channels)
    return set_feature_layers(model, ["layer1", "layer2", "layer3"], "pool")
