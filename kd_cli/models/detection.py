"""Detectors: torchvision's (Faster R-CNN, RetinaNet, FCOS, SSDlite) and kd's small FCOS, on kd's terms.

`Detector` wraps a torchvision detector so that kd's loop can train and score it like any model:
- labels are 0..C-1 in and out (Faster R-CNN and SSD keep class 0 for the background: shifted by one);
- the images arrive normalised by kd's loader at the size the data set gives, so torchvision's transform
  is set not to resize (`min_size = max_size = input_size`) nor normalise again (mean 0, std 1): what the
  loader gives is exactly what the backbone sees, for the student and for the teacher;
- a grey data set's images are repeated to three channels for the ImageNet-shaped torchvision backbones.
In training, `forward(images, targets)` returns the detector's loss dict; in evaluation, per-image dicts
of `boxes`, `labels`, `scores`. Feature methods read `detector.backbone`'s output: the FPN levels.

`kd_fcos` / `kd_fcos_tiny` are torchvision's FCOS on a small conv backbone with an FPN over strides 4,
8 and 16: the teacher and student of the digit scenes, trained in a minute or two on a CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from kd_cli.errors import KdError
from kd_cli.models.registry import register_model
from kd_cli.registry import PositiveInt, Probability

# Scores below this are not kept: COCO mAP is computed over a ranked list, so evaluation keeps low scores.
SCORE_THRESH = 0.05


class Detector(nn.Module):
    """A torchvision detector taking kd's batches (see the module docstring)."""

    def __init__(self, detector: nn.Module, label_offset: int, in_channels: int, model_channels: int):
        super().__init__()
        self.detector = detector
        # kd import: a torchvision checkpoint's keys (`backbone.body...`) are this wrapper's `detector.` ones
        self.kd_foreign_key_map = {"": "detector."}
        self.label_offset = label_offset  # 1 where the detector's class 0 is the background
        self.repeat = model_channels // in_channels if in_channels != model_channels else 1

    def forward(self, images: torch.Tensor, targets: list[dict[str, Any]] | None = None):
        if self.repeat > 1:
            images = images.repeat(1, self.repeat, 1, 1)
        if self.training:
            if targets is None:
                raise KdError("a detector in training needs the batch's boxes (targets)")
            shifted = [{"boxes": t["boxes"], "labels": t["labels"] + self.label_offset} for t in targets]
            return self.detector(images, shifted)
        detections = self.detector(images)
        if self.label_offset:
            detections = [{**d, "labels": d["labels"] - self.label_offset} for d in detections]
        return detections


def fixed_size_transform(detector: nn.Module, input_size: int, channels: int, size_divisible: int) -> None:
    """torchvision's transform set to leave kd's batches as they are: no resize, no second normalisation."""
    transform: Any = detector.transform  # (torchvision's GeneralizedRCNNTransform)
    transform.min_size = (input_size,)
    transform.max_size = input_size
    transform.image_mean = [0.0] * channels
    transform.image_std = [1.0] * channels
    transform.size_divisible = size_divisible


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallFpnBackbone(nn.Module):
    """A stride-2 stem and three stages (strides 4, 8, 16; widths 2w, 4w, 8w) under torchvision's FPN."""

    def __init__(self, in_channels: int, width: int, fpn_channels: int):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

        self.stem = nn.Sequential(conv_bn_relu(in_channels, width), conv_bn_relu(width, width, 2))
        widths = [2 * width, 4 * width, 8 * width]
        stages, c_in = [], width
        for c_out in widths:
            stages.append(nn.Sequential(conv_bn_relu(c_in, c_out, 2), conv_bn_relu(c_out, c_out)))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.fpn = FeaturePyramidNetwork(widths, fpn_channels)
        self.out_channels = fpn_channels  # what torchvision's heads read

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        levels = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            levels[f"p{i + 2}"] = x
        return self.fpn(levels)


def _kd_fcos(
    num_classes: int,
    in_channels: int,
    input_size: int,
    width: int,
    fpn_channels: int,
    head_convs: int,
    score_thresh: float,
) -> nn.Module:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    if fpn_channels % 32:
        raise KdError(
            f"fpn_channels={fpn_channels}: FCOS's head normalises in 32 groups; give a multiple of 32 (32, 64, ...)"
        )
    if input_size < 16:
        raise KdError(f"kd_fcos needs images of at least 16x16 (its coarsest level is 1/16), got {input_size}")
    backbone = SmallFpnBackbone(in_channels, width, fpn_channels)
    # One location per cell of each level; the sizes (2x the stride) only scale FCOS's regression targets.
    anchors = AnchorGenerator(((8,), (16,), (32,)), ((1.0,),) * 3)
    detector = FCOS(
        backbone,
        num_classes=num_classes,
        anchor_generator=anchors,
        head=FCOSHead(fpn_channels, 1, num_classes, num_convs=head_convs),
        score_thresh=score_thresh,
        detections_per_img=100,
        topk_candidates=1000,
    )
    fixed_size_transform(detector, input_size, in_channels, size_divisible=16)
    return Detector(detector, 0, in_channels, in_channels)


@register_model("kd_fcos")
def kd_fcos(
    num_classes: int,
    in_channels: int,
    input_size: int,
    width: PositiveInt = 32,
    fpn_channels: PositiveInt = 64,
    head_convs: PositiveInt = 2,
    score_thresh: Probability = SCORE_THRESH,
) -> nn.Module:
    """FCOS on a small backbone (`width` channels after the stem, doubling per stage), `fpn_channels` FPN
    channels (a multiple of 32), `head_convs` convs per head branch."""
    return _kd_fcos(num_classes, in_channels, input_size, width, fpn_channels, head_convs, score_thresh)


@register_model("kd_fcos_tiny")
def kd_fcos_tiny(
    num_classes: int,
    in_channels: int,
    input_size: int,
    width: PositiveInt = 8,
    fpn_channels: PositiveInt = 32,
    head_convs: PositiveInt = 1,
    score_thresh: Probability = SCORE_THRESH,
) -> nn.Module:
    """kd_fcos at a quarter of the width, one conv per head branch: the digit scenes' student."""
    return _kd_fcos(num_classes, in_channels, input_size, width, fpn_channels, head_convs, score_thresh)


# torchvision's detectors: builder name, whether class 0 is the background, the divisor of padded sizes,
# and the ImageNet weights of the backbone (`pretrained_backbone=true`, torchvision's `weights_backbone`).
TORCHVISION_DETECTORS = {
    "fasterrcnn_resnet50_fpn": (1, 32, "ResNet50_Weights.IMAGENET1K_V1"),
    "fasterrcnn_mobilenet_v3_large_fpn": (1, 32, "MobileNet_V3_Large_Weights.IMAGENET1K_V1"),
    "retinanet_resnet50_fpn": (0, 32, "ResNet50_Weights.IMAGENET1K_V1"),
    "fcos_resnet50_fpn": (0, 32, "ResNet50_Weights.IMAGENET1K_V1"),
    "ssdlite320_mobilenet_v3_large": (1, 1, "MobileNet_V3_Large_Weights.IMAGENET1K_V1"),
}


def _torchvision_detector(
    name: str,
    num_classes: int,
    in_channels: int,
    input_size: int,
    score_thresh: float,
    trainable_backbone_layers: int | None,
    pretrained_backbone: bool = False,
) -> nn.Module:
    import torchvision

    if in_channels not in (1, 3):
        raise KdError(
            f"model {name} takes RGB (or grey, repeated to RGB) images; the data set's have {in_channels} channels"
        )
    label_offset, size_divisible, backbone_weights = TORCHVISION_DETECTORS[name]
    options: dict[str, Any] = {
        "weights": None,
        "weights_backbone": torchvision.models.get_weight(backbone_weights) if pretrained_backbone else None,
        "num_classes": num_classes + label_offset,
    }
    if name.startswith("ssdlite"):
        options["score_thresh"] = score_thresh
    else:
        options["box_score_thresh" if name.startswith("fasterrcnn") else "score_thresh"] = score_thresh
    if trainable_backbone_layers is not None:
        options["trainable_backbone_layers"] = trainable_backbone_layers
    try:
        detector = torchvision.models.get_model(name, **options)
    except (OSError, RuntimeError, ValueError) as error:  # no network, a bad download, a full disk
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KdError(
            f"could not load the ImageNet backbone weights of {name}: {reason}; run with "
            "pretrained_backbone=false, put the file in torch's hub cache, or run on a machine with internet once"
        ) from None
    if name.startswith("ssdlite"):
        detector.transform.fixed_size = (input_size, input_size)
    fixed_size_transform(detector, input_size, 3, size_divisible)
    return Detector(detector, label_offset, in_channels, 3)


def _register_torchvision(name: str) -> None:
    def build(
        num_classes: int,
        in_channels: int,
        input_size: int,
        score_thresh: Probability = SCORE_THRESH,
        trainable_backbone_layers: int | None = None,
        pretrained_backbone: bool = False,
    ) -> nn.Module:
        return _torchvision_detector(
            name, num_classes, in_channels, input_size, score_thresh, trainable_backbone_layers, pretrained_backbone
        )

    build.__doc__ = (
        f"torchvision's {name}, labels 0..C-1 and kd's normalised batches; pretrained_backbone=true loads its "
        "backbone's ImageNet weights (torch's hub cache, else a download), the FPN and heads new."
    )
    build.task = "detection"  # type: ignore[attr-defined]
    register_model(name)(build)


for _name in TORCHVISION_DETECTORS:
    _register_torchvision(_name)

kd_fcos.task = "detection"  # type: ignore[attr-defined]
kd_fcos_tiny.task = "detection"  # type: ignore[attr-defined]
