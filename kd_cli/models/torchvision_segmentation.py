"""torchvision's segmentation models by name: FCN and DeepLabV3 (ResNet-50/101, DeepLabV3 also
MobileNetV3-Large) and LR-ASPP (MobileNetV3-Large), adapted to the data set's channels and classes.

torchvision's models return a dict; kd's loop wants the logits, so the network is wrapped to return
`out` (full input resolution, as torchvision upsamples). `aux_loss` heads are left off: their logits
would need a second task-loss term the loop does not add yet. `pretrained_backbone=true` loads the
backbone's ImageNet weights through torchvision's own weights API (downloads once into the torch cache;
the heads are new, as torchvision does with `weights_backbone`); a grey data set gets the first conv's
filters averaged over RGB. Feature methods read the backbone's stages and the head's last hidden map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kd_cli.errors import KdError
from kd_cli.models.blocks import check_io
from kd_cli.models.features import set_feature_layers
from kd_cli.models.registry import register_model


@dataclass(frozen=True)
class SegParts:
    stem: str  # the backbone's first conv (inside the wrapper: under `net.`)
    stages: tuple[str, ...]  # the backbone's stage outputs, shallow to deep
    head: str  # the head's last hidden map, before its classifier conv
    backbone: str  # the backbone's weights name for torchvision.models.get_weight


RESNET_STAGES = tuple(f"net.backbone.layer{i}" for i in range(1, 5))
MOBILENET_STAGES = ("net.backbone.3", "net.backbone.6", "net.backbone.12", "net.backbone.16")
PARTS: dict[str, SegParts] = {
    "fcn_resnet50": SegParts("net.backbone.conv1", RESNET_STAGES, "net.classifier.2", "ResNet50_Weights.DEFAULT"),
    "fcn_resnet101": SegParts("net.backbone.conv1", RESNET_STAGES, "net.classifier.2", "ResNet101_Weights.DEFAULT"),
    "deeplabv3_resnet50": SegParts("net.backbone.conv1", RESNET_STAGES, "net.classifier.3", "ResNet50_Weights.DEFAULT"),
    "deeplabv3_resnet101": SegParts(
        "net.backbone.conv1", RESNET_STAGES, "net.classifier.3", "ResNet101_Weights.DEFAULT"
    ),
    "deeplabv3_mobilenet_v3_large": SegParts(
        "net.backbone.0.0", MOBILENET_STAGES, "net.classifier.3", "MobileNet_V3_Large_Weights.DEFAULT"
    ),
    "lraspp_mobilenet_v3_large": SegParts(
        "net.backbone.0.0", MOBILENET_STAGES, "net.classifier.cbr", "MobileNet_V3_Large_Weights.DEFAULT"
    ),
}


AUX_WEIGHT = 0.5  # the auxiliary head's share of the training loss: torchvision's segmentation reference


class LogitsOnly(nn.Module):
    """A torchvision segmenter returning its `out` logits (B, classes, H, W) instead of a dict.

    With an auxiliary head (FCN and DeepLabV3 built with `aux_loss=true`), the head runs in training only:
    its logits, at the input's size, are left for the training loss (`kd_aux_logits`, read once by
    methods.base.Distiller.auxiliary_terms), and evaluation, export and compression see the main head alone."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux_head = getattr(self.net, "aux_classifier", None)
        if aux_head is None:
            return self.net(x)["out"]
        net = cast(Any, self.net)  # torchvision's _SimpleSegmentationModel: backbone, classifier, aux_classifier
        features = net.backbone(x)
        out = F.interpolate(net.classifier(features["out"]), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.training:
            aux = F.interpolate(aux_head(features["aux"]), size=x.shape[-2:], mode="bilinear", align_corners=False)
            self.__dict__["kd_aux_logits"] = aux  # (a plain attribute: not a buffer, never saved)
        return out


def without_training_heads(model: nn.Module, kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The model and its options without an auxiliary head (a training aid, never used to predict): what
    `kd compress` shrinks, so that pruning, which traces the inference graph, sees every layer it changes."""
    net = getattr(model, "net", None)
    if not isinstance(model, LogitsOnly) or getattr(net, "aux_classifier", None) is None:
        return model, kwargs
    cast(Any, net).aux_classifier = None
    return model, {**kwargs, "aux_loss": False}


def build_segmenter(
    arch: str, num_classes: int, in_channels: int, input_size: int, pretrained_backbone: bool, aux_loss: bool = False
) -> nn.Module:
    parts = PARTS[arch]
    # ResNet and MobileNetV3 backbones divide the input by 32 (8 with DeepLab's dilation): below 32 px the
    # deepest maps are 1x1 and ASPP's pooling branch has nothing to pool over
    check_io(arch, num_classes, in_channels, input_size, min_size=32)
    weights_backbone = torchvision.models.get_weight(parts.backbone) if pretrained_backbone else None
    try:
        net = torchvision.models.get_model(
            arch, weights=None, weights_backbone=weights_backbone, num_classes=num_classes, aux_loss=aux_loss
        )
    except (OSError, RuntimeError, ValueError) as error:  # no network, a bad download, a full disk
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KdError(
            f"could not load the ImageNet backbone weights of {arch}: {reason}; "
            "run with pretrained_backbone=false, or on a machine with internet once"
        ) from None
    model = LogitsOnly(net)
    if in_channels != 3:
        adapt_first_conv(model, parts.stem, in_channels, pretrained_backbone)
    return set_feature_layers(model, parts.stages, parts.head)


def adapt_first_conv(model: nn.Module, name: str, in_channels: int, pretrained: bool) -> None:
    old = cast(nn.Conv2d, model.get_submodule(name))
    geometry = cast(
        "tuple[tuple[int, int], tuple[int, int], tuple[int, int]]", (old.kernel_size, old.stride, old.padding)
    )
    new = nn.Conv2d(in_channels, old.out_channels, *geometry, bias=old.bias is not None)
    if pretrained:  # a grey image gets the response the RGB filters give to the same value in every channel
        with torch.no_grad():
            new.weight.copy_(old.weight.mean(1, keepdim=True).expand_as(new.weight) * 3 / in_channels)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _builder(arch: str) -> Callable[..., nn.Module]:
    if arch.startswith("lraspp"):  # LR-ASPP has no auxiliary head

        def build(num_classes: int, in_channels: int, input_size: int, pretrained_backbone: bool = False) -> nn.Module:
            return build_segmenter(arch, num_classes, in_channels, input_size, pretrained_backbone)

    else:

        def build(  # type: ignore[misc]  # (the other signature, for the heads that have an auxiliary one)
            num_classes: int,
            in_channels: int,
            input_size: int,
            pretrained_backbone: bool = False,
            aux_loss: bool = False,
        ) -> nn.Module:
            return build_segmenter(arch, num_classes, in_channels, input_size, pretrained_backbone, aux_loss)

    build.__name__ = build.__qualname__ = arch
    build.__doc__ = (
        f"torchvision {arch} (segmentation; the `out` logits); pretrained_backbone=true loads its backbone's "
        "ImageNet weights (downloads once)"
        + (
            ""
            if arch.startswith("lraspp")
            else f"; aux_loss=true trains an auxiliary head too ({AUX_WEIGHT} x its loss)"
        )
        + "."
    )
    build.task = "segmentation"  # type: ignore[attr-defined]  # models.registry.model_task
    if not arch.startswith("lraspp"):  # kd import tries both: a checkpoint saved with its aux head fits only one
        build.layout_options = {"aux_loss": (False, True)}  # type: ignore[attr-defined]
    return build


for _arch in PARTS:
    register_model(_arch)(_builder(_arch))
