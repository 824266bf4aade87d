"""ShuffleNetV2 (Ma et al. 2018) for CIFAR as used in the KD literature (CRD / RepDistiller), 1x by default.

A basic unit splits the channels in two halves, transforms one (1x1 - 3x3 depthwise - 1x1) and
concatenates it with the untouched half, then shuffles; a down-sampling unit runs two stride-2
branches on the whole input and concatenates them. Each stage is one down-sampling unit followed
by 3, 7, 3 basic units; a 1x1 stem of 24 channels (CIFAR: no stride-2 stem, no max-pool) and a final
1x1 conv before pooling.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from kd_cli.models.blocks import GlobalAvgPool, check_io
from kd_cli.models.features import set_feature_layers
from kd_cli.models.registry import register_model
from kd_cli.models.shufflenetv1 import channel_shuffle

STEM_CHANNELS = 24
# net size -> (channels of the three stages and of the final conv, basic units per stage), paper table 5
SIZES = {
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((244, 488, 976, 2048), (3, 7, 3)),
}


def depthwise_bn(channels: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False), nn.BatchNorm2d(channels)]


def pointwise_bn_relu(in_planes: int, out_planes: int) -> list[nn.Module]:
    return [nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes), nn.ReLU()]


class BasicUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            *pointwise_bn_relu(half, half), *depthwise_bn(half, 1), *pointwise_bn_relu(half, half)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, transformed = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([kept, self.branch(transformed)], 1), 2)


class DownUnit(nn.Module):
    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        mid = out_planes // 2
        self.left = nn.Sequential(*depthwise_bn(in_planes, 2), *pointwise_bn_relu(in_planes, mid))
        self.right = nn.Sequential(
            *pointwise_bn_relu(in_planes, mid), *depthwise_bn(mid, 2), *pointwise_bn_relu(mid, mid)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, net_size: float):
        super().__init__()
        channels, units = SIZES[net_size]
        self.conv1 = nn.Sequential(*pointwise_bn_relu(in_channels, STEM_CHANNELS))
        c_in, stages = STEM_CHANNELS, []
        for c_out, n in zip(channels[:3], units):
            stages.append(nn.Sequential(DownUnit(c_in, c_out), *(BasicUnit(c_out) for _ in range(n))))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Sequential(*pointwise_bn_relu(c_in, channels[3]))
        self.pool = GlobalAvgPool()
        self.linear = nn.Linear(channels[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.linear(self.pool(self.conv2(x)))


# typing allows no float Literal (hence the ignore), but kd's registry checks net_size against this one
@register_model("shufflenetv2")
def shufflenetv2(
    num_classes: int,
    in_channels: int,
    input_size: int,
    net_size: Literal[0.5, 1.0, 1.5, 2.0] = 1.0,  # type: ignore[valid-type]
) -> nn.Module:
    """RepDistiller's ShuffleV2 at the default net_size=1.0; net_size in 0.5, 1.0, 1.5, 2.0 (SIZES)."""
    check_io("shufflenetv2", num_classes, in_channels, input_size)
    model = ShuffleNetV2(num_classes, in_channels, float(net_size))
    return set_feature_layers(model, ["layer1", "layer2", "layer3"], "pool")
