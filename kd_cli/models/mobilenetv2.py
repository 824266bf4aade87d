"""MobileNetV2 (Sandler et al. 2018) for CIFAR as used in the KD literature ("MobileNetV2" of CRD is width 0.5).

Inverted residual blocks: 1x1 expansion (ratio t) - 3x3 depthwise - 1x1 linear projection, with an
identity shortcut when shape is kept. The stage table is the paper's; the stride-2 stem and the
stride of the second stage follow RepDistiller's CIFAR version (32x32 ends at 2x2), and, as there,
even the t=1 block keeps its 1x1 expansion conv.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from kd_cli.models.blocks import GlobalAvgPool, check_io, conv_bn_relu
from kd_cli.models.features import set_feature_layers
from kd_cli.models.registry import register_model
from kd_cli.registry import PositiveInt, Range

# (channels, blocks, stride of the first block) per stage, at width 1
STAGES = [(16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1)]
LAST_CHANNELS = 1280
# The narrowest stage has 16 channels at width 1: below 1/16 it would have none.
WidthMult = Annotated[float, Range(1 / 16)]


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_planes * expansion
        self.use_shortcut = stride == 1 and in_planes == out_planes
        self.conv = nn.Sequential(
            conv_bn_relu(in_planes, hidden, kernel=1),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),  # linear bottleneck: no ReLU after the projection
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width_mult: float, expansion: int):
        super().__init__()
        c_in = int(32 * width_mult)
        self.conv1 = conv_bn_relu(in_channels, c_in, stride=2)
        blocks = []
        for i, (channels, n, stride) in enumerate(STAGES):
            c_out = int(channels * width_mult)
            t = 1 if i == 0 else expansion  # the first stage does not expand (paper, table 2)
            layers = []
            for s in [stride] + [1] * (n - 1):
                layers.append(InvertedResidual(c_in, c_out, s, t))
                c_in = c_out
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        last = int(LAST_CHANNELS * width_mult) if width_mult > 1.0 else LAST_CHANNELS
        self.conv2 = conv_bn_relu(c_in, last, kernel=1)
        self.pool = GlobalAvgPool()
        self.classifier = nn.Linear(last, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.blocks(self.conv1(x)))
        return self.classifier(self.pool(x))


@register_model("mobilenetv2")
def mobilenetv2(
    num_classes: int, in_channels: int, input_size: int, width_mult: WidthMult = 0.5, expansion: PositiveInt = 6
) -> nn.Module:
    """RepDistiller's `mobile_half` at the default width_mult=0.5; width_mult=1.0 is the full net."""
    check_io("mobilenetv2", num_classes, in_channels, input_size)
    model = MobileNetV2(num_classes, in_channels, float(width_mult), expansion)
    # stage outputs where RepDistiller reads f1..f4: the ends of blocks 1, 2, 4 and 6
    return set_feature_layers(model, ["blocks.1", "blocks.2", "blocks.4", "blocks.6"], "pool")
