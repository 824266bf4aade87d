"""CIFAR VGGs with batch norm, as used in the KD literature (CRD / RepDistiller): vgg8, vgg11, vgg13, vgg16, vgg19.

Simonyan & Zisserman's configurations A/B/D/E (plus the 8-layer "S"), in five blocks of
3x3 conv-BN-ReLU, without the three big fully connected layers: global pooling and one linear
classifier on 512 channels. Max-pools (2x2) follow blocks 0-2; the one after block 3 only runs
for inputs of 64 pixels or more, so 32x32 CIFAR ends at 4x4 (RepDistiller's layout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from kd_cli.models.blocks import GlobalAvgPool, check_io
from kd_cli.models.features import set_feature_layers
from kd_cli.models.registry import register_model

# conv widths of the five blocks
CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}
MIN_INPUT = 8  # three 2x2 max-pools must leave at least one pixel


def make_block(in_planes: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        # conv bias kept despite BN, as in the reference implementation (parameter counts match)
        layers += [nn.Conv2d(in_planes, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_planes = width
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int, in_channels: int, input_size: int):
        super().__init__()
        ins = [in_channels] + [widths[-1] for widths in cfg[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            make_block(c, widths) for c, widths in zip(ins, cfg)
        )
        self.pool0, self.pool1, self.pool2 = (nn.MaxPool2d(2) for _ in range(3))
        self.pool3 = nn.MaxPool2d(2) if input_size >= 64 else nn.Identity()
        self.pool = GlobalAvgPool()
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                assert m.bias is not None  # make_block keeps every conv's bias
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)  # small logits at the start, as in the reference
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.pool3(self.block3(x)))
        return self.classifier(self.pool(x))


def _builder(name: str, cfg: Sequence[Sequence[int]]) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        check_io(name, num_classes, in_channels, input_size, min_size=MIN_INPUT)
        model = CifarVGG(cfg, num_classes, in_channels, input_size)
        return set_feature_layers(model, ["block1", "block2", "block3", "block4"], "pool")

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"CIFAR {name} with batch norm (RepDistiller's {name}_bn)."
    return build


for _name, _cfg in CONFIGS.items():
    register_model(_name)(_builder(_name, _cfg))
