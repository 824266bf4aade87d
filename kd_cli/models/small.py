"""Small, CPU-fast nets for the embedded digits (8x8) and MNIST (28x28): `mlp` and `cnn`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_cli.errors import KdError
from kd_cli.models.blocks import DropoutRate, GlobalAvgPool, check_io, conv_bn_relu
from kd_cli.models.features import set_feature_layers
from kd_cli.models.registry import register_model
from kd_cli.registry import PositiveInt


class MLP(nn.Module):
    """flatten -> [Linear-ReLU] per hidden width -> Linear. Dropout sits between layers, outside
    the hooked blocks, so the features a method reads are the same in train and eval mode."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, dropout: float):
        super().__init__()
        self.flatten = nn.Flatten()
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths[:-1], widths[1:]))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for layer in self.hidden:
            x = self.dropout(layer(x))
        return self.fc(x)


@register_model("mlp")
def mlp(
    num_classes: int,
    in_channels: int,
    input_size: int,
    hidden: Sequence[PositiveInt] = (32,),
    dropout: DropoutRate = 0.0,
) -> nn.Module:
    """`hidden`: the widths of the hidden layers, e.g. [256, 128] ([] is a linear classifier)."""
    check_io("mlp", num_classes, in_channels, input_size)
    hidden = list(hidden)
    model = MLP(in_channels * input_size * input_size, hidden, num_classes, dropout)
    stages = [f"hidden.{i}" for i in range(len(hidden))]
    return set_feature_layers(model, stages, stages[-1] if stages else "flatten")


class SmallCNN(nn.Module):
    """`depth` stages of two conv-bn-relu at widths width, 2*width, ...; a 2x2 max-pool opens
    every stage after the first, then global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, width: int, depth: int, dropout: float):
        super().__init__()
        stages, c_in = [], in_channels
        for i in range(depth):
            c_out = width * 2**i
            pool = [nn.MaxPool2d(2)] if i > 0 else []
            stages.append(nn.Sequential(*pool, conv_bn_relu(c_in, c_out), conv_bn_relu(c_out, c_out)))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = GlobalAvgPool()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.stages(x))))


@register_model("cnn")
def cnn(
    num_classes: int,
    in_channels: int,
    input_size: int,
    width: PositiveInt = 32,
    depth: PositiveInt = 2,
    dropout: DropoutRate = 0.0,
) -> nn.Module:
    # each stage after the first halves the resolution: depth stages need 2**(depth-1) pixels
    min_size = 2 ** (depth - 1)
    if input_size < min_size:
        raise KdError(
            f"model 'cnn' with depth={depth} needs inputs of at least {min_size}x{min_size}, got {input_size}; "
            f"lower depth (at most {max(1, int(input_size).bit_length())} for {input_size}px)"
        )
    check_io("cnn", num_classes, in_channels, input_size)
    model = SmallCNN(in_channels, num_classes, width, depth, dropout)
    return set_feature_layers(model, [f"stages.{i}" for i in range(depth)], "pool")
