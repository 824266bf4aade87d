"""Small segmentation nets that train in seconds on a CPU: `segcnn` (the digit scenes' teacher) and
`segcnn_tiny` (their student), one encoder-decoder at two widths.

The encoder is SmallCNN's (two conv-bn-relu per stage, a 2x2 max-pool opening every stage after the
first); the decoder is FPN-like: the deepest stage, upsampled, is added to each shallower stage's 1x1
projection, a 3x3 conv mixes them, and a 1x1 classifier gives per-pixel logits at the input's size.
Feature methods read the encoder stages (`stages.i`) and the decoder's last map (`decoder.fuse`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError
from kd_cli.models.blocks import check_io, conv_bn_relu
from kd_cli.models.features import set_feature_layers
from kd_cli.models.registry import register_model
from kd_cli.registry import PositiveInt


class Decoder(nn.Module):
    def __init__(self, widths: list[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(w, channels, 1) for w in widths)
        self.fuse = conv_bn_relu(channels, channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](features[-1])
        for feature, lateral in zip(reversed(features[:-1]), reversed(self.lateral[:-1])):
            x = F.interpolate(x, size=feature.shape[-2:], mode="bilinear", align_corners=False) + lateral(feature)
        return self.fuse(x)


class SegCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int, depth: int):
        super().__init__()
        stages, widths, c_in = [], [], in_channels
        for i in range(depth):
            c_out = width * 2**i
            pool = [nn.MaxPool2d(2)] if i > 0 else []
            stages.append(nn.Sequential(*pool, conv_bn_relu(c_in, c_out), conv_bn_relu(c_out, c_out)))
            widths.append(c_out)
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.decoder = Decoder(widths, width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The first stage keeps the input's size and the decoder returns to it: logits come out at the
        # input's size with no resize (and no branch on shapes, so torch.fx traces it for int8).
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return self.classifier(self.decoder(features))


def _segcnn(arch: str, num_classes: int, in_channels: int, input_size: int, width: int, depth: int) -> nn.Module:
    min_size = 2 ** (depth - 1)
    if input_size < min_size:
        raise KdError(
            f"model '{arch}' with depth={depth} needs inputs of at least {min_size}x{min_size}, got {input_size}; "
            "lower depth or use larger images"
        )
    check_io(arch, num_classes, in_channels, input_size)
    model = SegCNN(in_channels, num_classes, width, depth)
    return set_feature_layers(model, [f"stages.{i}" for i in range(depth)], "decoder.fuse")


@register_model("segcnn")
def segcnn(
    num_classes: int, in_channels: int, input_size: int, width: PositiveInt = 32, depth: PositiveInt = 3
) -> nn.Module:
    """`width` channels in the first stage (doubling per stage) and in the decoder; `depth` stages."""
    return _segcnn("segcnn", num_classes, in_channels, input_size, width, depth)


@register_model("segcnn_tiny")
def segcnn_tiny(
    num_classes: int, in_channels: int, input_size: int, width: PositiveInt = 8, depth: PositiveInt = 3
) -> nn.Module:
    """segcnn at the size of a student: 8 channels in the first of its 3 stages (a quarter of segcnn's)."""
    return _segcnn("segcnn_tiny", num_classes, in_channels, input_size, width, depth)


segcnn.task = "segmentation"  # type: ignore[attr-defined]  # the task a model serves (models.registry.model_task)
segcnn_tiny.task = "segmentation"  # type: ignore[attr-defined]
