"""segmentation-models-pytorch's architectures with any of its encoders: `student.arch=smp/unet
student.kwargs.encoder=mobilenet_v2` (an optional extra: pip install 'kd-cli[smp]').

The architectures are smp's (`unet`, `unetplusplus`, `fpn`, `pspnet`, `deeplabv3`, `deeplabv3plus`,
`linknet`, `manet`, `pan`, `upernet`, `segformer`, ...), built by its `create_model` for the data set's
classes and channels; `encoder` is any name of `smp.encoders.get_encoder_names()` (its own ResNets,
MobileNets, EfficientNets, and every timm model as `tu-NAME`). `pretrained_backbone=true` loads the
encoder's ImageNet weights from the user's cache (or the network, where there is one).
Features for methods: the encoder's stage outputs (for each resolution the encoder reaches, from 1/4
down, the outermost encoder module that ends at it, found by a dry run) and the decoder's output (the
head's last hidden map, before smp's segmentation head).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

from kd_cli.errors import KdError
from kd_cli.models.blocks import check_io
from kd_cli.models.features import set_feature_layers
from kd_cli.models.hub import HUB_HOST, hub_offline, hub_quiet, reachable
from kd_cli.models.registry import MODELS

PREFIX = "smp/"
INSTALL = "pip install 'kd-cli[smp]'"


def import_smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise KdError(f"smp/ models need segmentation-models-pytorch: {INSTALL}") from None
    return smp


def resolve(name: str) -> Callable[..., nn.Module]:
    smp = import_smp()
    architectures = sorted(smp.MODEL_ARCHITECTURES_MAPPING)
    if name not in architectures:
        close = difflib.get_close_matches(name.lower(), architectures, n=3)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise KdError(f"unknown smp architecture '{name}'{hint} (smp has: {', '.join(architectures)})")
    return _builder(name)


@functools.cache
def _builder(architecture: str) -> Callable[..., nn.Module]:
    def build(
        num_classes: int,
        in_channels: int,
        input_size: int,
        encoder: str = "resnet34",
        pretrained_backbone: bool = False,
    ) -> nn.Module:
        return build_smp(architecture, num_classes, in_channels, input_size, encoder, pretrained_backbone)

    build.__name__ = build.__qualname__ = PREFIX + architecture
    build.__doc__ = f"smp {architecture}; encoder: any smp encoder name; pretrained_backbone: its ImageNet weights."
    # (the ignores: mypy knows no attributes of a function beyond its own)
    build.__signature__ = inspect.signature(build)  # type: ignore[attr-defined]
    build.task = "segmentation"  # type: ignore[attr-defined]  # models.registry.model_task
    return build


def build_smp(
    architecture: str, num_classes: int, in_channels: int, input_size: int, encoder: str, pretrained: bool
) -> nn.Module:
    smp = import_smp()
    check_io(PREFIX + architecture, num_classes, in_channels, input_size, min_size=32)
    encoders = smp.encoders.get_encoder_names()
    if encoder not in encoders and not encoder.startswith("tu-"):
        close = difflib.get_close_matches(encoder, encoders, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KdError(f"unknown smp encoder '{encoder}'{hint} (smp.encoders.get_encoder_names() lists {len(encoders)})")
    options = dict(encoder_name=encoder, in_channels=in_channels, classes=num_classes)
    try:
        model = _create(smp, architecture, options, pretrained)
    except (KeyError, ValueError, AssertionError, TypeError) as error:  # a pairing smp does not build
        raise KdError(f"smp cannot build {architecture} with encoder {encoder} ({str(error)[:120]})") from None
    return set_feature_layers(model, encoder_stages(model, in_channels, input_size), "decoder")


def _create(smp, architecture: str, options: dict, pretrained: bool) -> nn.Module:
    """smp's model; with pretrained encoder weights, from the local cache first (no network call), then the
    hub where it can be reached, else one line saying how to get them."""
    if not pretrained:
        return smp.create_model(architecture, encoder_weights=None, **options)
    try:
        with hub_offline():
            return smp.create_model(architecture, encoder_weights="imagenet", **options)
    except (KeyError, ValueError, AssertionError, TypeError):
        raise
    except Exception:  # noqa: BLE001 - the hub raises many kinds for "not in the cache"
        if not reachable(HUB_HOST):
            raise KdError(
                f"no ImageNet weights for smp encoder {options['encoder_name']} in the local cache and no network "
                "to fetch them: run once on a machine with internet and copy ~/.cache/huggingface here, or set "
                "pretrained_backbone=false"
            ) from None
    try:
        with hub_quiet():
            return smp.create_model(architecture, encoder_weights="imagenet", **options)
    except Exception as error:  # noqa: BLE001
        raise KdError(
            f"could not download the smp encoder weights ({str(error).splitlines()[0][:100]}); retry"
        ) from None


def encoder_stages(model: nn.Module, in_channels: int, input_size: int) -> list[str]:
    """For each resolution of 1/4 and below that the encoder reaches, the last encoder module (in the order
    they finish) whose 4-d output is at that size and whose enclosing modules give that size too: a block's
    output, not the expansion conv inside the next block that still runs at the old size."""
    sizes: dict[str, int] = {}  # module name -> the side of its 4-d output, in the order modules finish
    hooks = [
        module.register_forward_hook(_remember(name, sizes))
        for name, module in model.named_modules()
        if name.startswith("encoder.")
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, input_size, input_size))
    except RuntimeError as error:
        raise KdError(
            f"{type(model).__name__} cannot run on {input_size}x{input_size} images ({str(error)[:120]})"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train()
    last_at: dict[int, str] = {}
    for name, side in sizes.items():
        enclosing = [sizes.get(name[:i]) for i, char in enumerate(name) if char == "."]
        if all(other in (None, side) for other in enclosing):
            last_at[side] = name
    return [last_at[side] for side in sorted(last_at, reverse=True) if side <= input_size // 4][:4]


def _remember(name: str, sizes: dict[str, int]):
    def hook(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            sizes.pop(name, None)  # a module called twice counts where it last finished
            sizes[name] = int(output.shape[-1])

    return hook


MODELS.family(PREFIX, resolve)
