"""torchvision classifiers by name, adapted to the data set's channels, classes and image size.

Small images (under 64 px): an ImageNet stem shrinks 32x32 CIFAR to 8x8 (or 1x1 for ConvNeXt)
before the first stage, so the stem conv becomes a 3x3 stride-1 conv with the same output channels
and the stem max-pool, where there is one, is dropped (the usual CIFAR adaptation of these nets).
`stem` chooses: `auto` (that rule), `small` (the 3x3 stem at any size) or `imagenet` (torchvision's own
stem at any size: what a CIFAR script that calls `torchvision.models.resnet18(num_classes=10)` trains,
so its checkpoints fit; `kd import` picks the one a checkpoint fits when `stem` is not given).
`pretrained=True` loads torchvision's ImageNet weights first and adapts afterwards: the classifier
is new whenever the class count differs, and so is an adapted stem. `weights=PATH` does the same from
a local file in torchvision's layout (your own fine-tuned checkpoint, or ImageNet weights copied here).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torchvision
from torch import nn

from kd_cli.errors import KdError
from kd_cli.models.blocks import check_io
from kd_cli.models.features import set_feature_layers
from kd_cli.models.registry import register_model

SMALL_INPUT = 64  # below this, the ImageNet stem is replaced (see module docstring)
IMAGENET_CLASSES = 1000
Stem = Literal["auto", "small", "imagenet"]


@dataclass(frozen=True)
class Parts:
    """Where a torchvision family keeps the parts the adaptation touches (dotted module names)."""

    stem: str  # the first conv
    maxpool: str | None  # the stem max-pool, if any
    stages: tuple[str, ...]  # the last module at each resolution (/4, /8, /16, /32)
    classifier: str  # the final Linear
    pool: str | None = None  # a pooling module followed by torch.flatten in forward: made to flatten itself
    embedding: str | None = None  # set when the embedding needs no new module (already a Flatten)
    head: str | None = None  # a classifier fed by a functional pool: an identity is put in front of it
    min_adapted_input: int = 1  # smallest input the small-input layout accepts


RESNET = Parts("conv1", "maxpool", ("layer1", "layer2", "layer3", "layer4"), "fc", pool="avgpool")
EFFICIENTNET = Parts(
    "features.0.0", None, ("features.2", "features.3", "features.5", "features.8"), "classifier.1", pool="avgpool"
)
SPECS: dict[str, Parts] = {
    "resnet18": RESNET,
    "resnet34": RESNET,
    "resnet50": RESNET,
    "resnext50_32x4d": RESNET,
    "wide_resnet50_2": RESNET,
    "mobilenet_v2": Parts(
        "features.0.0",
        None,
        ("features.3", "features.6", "features.13", "features.18"),
        "classifier.1",
        head="classifier",
    ),
    "mobilenet_v3_small": Parts(
        "features.0.0", None, ("features.1", "features.3", "features.8", "features.12"), "classifier.3", pool="avgpool"
    ),
    "mobilenet_v3_large": Parts(
        "features.0.0", None, ("features.3", "features.6", "features.12", "features.16"), "classifier.3", pool="avgpool"
    ),
    "efficientnet_b0": EFFICIENTNET,
    "efficientnet_b1": EFFICIENTNET,
    "regnet_y_400mf": Parts("stem.0", None, tuple(f"trunk_output.block{i}" for i in range(1, 5)), "fc", pool="avgpool"),
    "shufflenet_v2_x1_0": Parts("conv1.0", "maxpool", ("stage2", "stage3", "conv5"), "fc", head="fc"),
    # ConvNeXt down-samples by 2x2 stride-2 convs between its four stages: 8 px leave 1 px at the end
    "convnext_tiny": Parts(
        "features.0.0",
        None,
        ("features.1", "features.3", "features.5", "features.7"),
        "classifier.2",
        embedding="classifier.1",
        min_adapted_input=8,
    ),
}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def download_imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's default ImageNet weights for `arch`, via its own weights API and cache."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except Exception as error:  # network, HTTP, disk or hash errors all mean: no weights here
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KdError(
            f"could not download pretrained weights for {arch}: {reason}; "
            f"run with pretrained=false or on a machine with internet"
        ) from error


def adapt_stem(model: nn.Module, spec: Parts, in_channels: int, small: bool, pretrained: bool) -> None:
    old = cast(nn.Conv2d, model.get_submodule(spec.stem))  # every Parts's stem is a conv
    if small:
        new = nn.Conv2d(in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None)
        replace_module(model, spec.stem, new)
        if spec.maxpool:
            replace_module(model, spec.maxpool, nn.Identity())
    elif in_channels != old.in_channels:
        # torch types a conv's geometry as tuple[int, ...]: a Conv2d's holds two ints (padding may be a str)
        size, stride, padding = cast(
            "tuple[tuple[int, int], tuple[int, int], str | tuple[int, int]]", (old.kernel_size, old.stride, old.padding)
        )
        new = nn.Conv2d(in_channels, old.out_channels, size, stride, padding, bias=old.bias is not None)
        if pretrained:
            # a grey image (same value in every channel) gets the same response as from the RGB filters
            with torch.no_grad():
                new.weight.copy_(old.weight.mean(1, keepdim=True).expand_as(new.weight) * 3 / in_channels)
                if old.bias is not None:
                    assert new.bias is not None  # built with bias=old.bias is not None
                    new.bias.copy_(old.bias)
        replace_module(model, spec.stem, new)


def add_embedding_module(model: nn.Module, spec: Parts) -> str:
    """Make sure one module outputs the pooled, flattened embedding; return its name."""
    if spec.pool:
        replace_module(model, spec.pool, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
        return spec.pool  # torch.flatten in the model's forward is then a no-op
    if spec.head:
        head = model.get_submodule(spec.head)
        replace_module(model, spec.head, nn.Sequential(OrderedDict(embedding=nn.Identity(), head=head)))
        # torchvision's own checkpoints name the head as it was: `kd import` and weights= map them here
        model.kd_foreign_key_map = {f"{spec.head}.": f"{spec.head}.head."}  # type: ignore[assignment]
        return f"{spec.head}.embedding"
    assert spec.embedding, "a Parts needs pool, head or embedding"
    return spec.embedding


def build_torchvision(
    arch: str,
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: bool,
    weights: str | None = None,
    stem: Stem = "auto",
) -> nn.Module:
    spec = SPECS[arch]
    small = stem == "small" or (stem == "auto" and input_size < SMALL_INPUT)
    check_io(arch, num_classes, in_channels, input_size, min_size=spec.min_adapted_input if small else 1)
    if pretrained and weights:
        raise KdError("give pretrained=true or weights=PATH, not both (weights=PATH is the local file to load)")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if pretrained or weights:
        from kd_cli.models.foreign_weights import fit_state, read_state_dict

        state = read_state_dict(weights) if weights else download_imagenet_state_dict(arch)  # not both (above)
        # the classifier is new when the weights were trained for other classes (ImageNet's 1000)
        fit_state(model, state, f"{arch} weights={weights or 'ImageNet'}", replaceable=(spec.classifier,))
    adapt_stem(model, spec, in_channels, small, pretrained or bool(weights))
    embedding = add_embedding_module(model, spec)
    return set_feature_layers(model, spec.stages, embedding)


def _builder(arch: str) -> Callable[..., nn.Module]:
    def build(
        num_classes: int,
        in_channels: int,
        input_size: int,
        pretrained: bool = False,
        weights: str | None = None,
        stem: Stem = "auto",
    ) -> nn.Module:
        return build_torchvision(arch, num_classes, in_channels, input_size, pretrained, weights, stem)

    build.__name__ = build.__qualname__ = arch
    build.layout_options = {"stem": ("auto", "imagenet", "small")}  # type: ignore[attr-defined]  # kd import tries them
    build.__doc__ = (
        f"torchvision {arch}; pretrained=true loads its ImageNet weights (downloads once), "
        "weights=PATH a local file (torchvision's layout: a state dict, nested or prefixed too); "
        "stem=auto|small|imagenet: the 3x3 small-input stem below 64 px (auto), always, or never."
    )
    return build


for _arch in SPECS:
    register_model(_arch)(_builder(_arch))
