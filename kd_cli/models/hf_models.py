"""Hugging Face transformers image classifiers (ViT, ConvNeXt, ResNet, Swin, ... any
`AutoModelForImageClassification`), as `arch=hf` with the model's config as its `config` option.

`kd import FOLDER arch=hf` reads the `save_pretrained` folder's config.json into that option (so
model.json can rebuild the network anywhere transformers is installed, with no folder) and its weights
through models/foreign_weights.py. The network's class count is the data set's; its channels and, for
models with a fixed patch grid, its image size must be the config's (a mismatch is one line saying
which dataset option to set). transformers is an optional extra: pip install 'kd-cli[hf]'.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from kd_cli.errors import KdError
from kd_cli.models.blocks import check_io
from kd_cli.models.features import (
    classifier_module,
    set_feature_layers,
    tap_classifier_input,
)
from kd_cli.models.registry import register_model

INSTALL = "pip install 'kd-cli[hf]'"


class HFClassifier(nn.Module):
    """logits = model(pixel_values=x).logits, so the network is called like every kd model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


@register_model("hf")
def hf(num_classes: int, in_channels: int, input_size: int, config: dict[str, Any] | None = None) -> nn.Module:
    """A transformers image classifier from its config (the content of config.json)."""
    if not config:
        raise KdError("arch=hf needs the model's config: kd import FOLDER arch=hf reads it from FOLDER/config.json")
    hf_config = _config(config)
    check_io("hf", num_classes, in_channels, input_size)
    channels = getattr(hf_config, "num_channels", in_channels)
    if channels != in_channels:
        raise KdError(
            f"the {hf_config.model_type} model takes {channels}-channel images and the data set has "
            f"{in_channels}; use a data set with {channels} channels"
        )
    size = _fixed_size(hf_config)
    if size is not None and size != input_size:
        raise KdError(
            f"the {hf_config.model_type} model takes {size}px images (its config's image_size) and the data "
            f"set gives {input_size}px; set dataset.image_size={size}"
        )
    hf_config.num_labels = num_classes
    from transformers import AutoModelForImageClassification

    return _as_kd_model(AutoModelForImageClassification.from_config(hf_config))


def hf_from_folder(folder, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """A save_pretrained folder loaded by transformers itself (local files only), checked against the data."""
    hf(
        num_classes, in_channels, input_size, json.loads((folder / "config.json").read_text())
    )  # every check, before loading
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report is kd's one line below, or nothing
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise KdError(f"transformers cannot load {folder} ({str(error).splitlines()[0][:160]})") from None
    if model.config.num_labels != num_classes:
        raise KdError(
            f"{folder} classifies {model.config.num_labels} classes and the data set has {num_classes}; "
            "import a model fine-tuned on these classes (or fine-tune it with kd train-teacher)"
        )
    return _as_kd_model(model)


def _as_kd_model(network: nn.Module) -> nn.Module:
    model = HFClassifier(network)
    model.eval()  # transformers builds in training mode; kd switches modes itself
    tap_classifier_input(model, classifier_module(model))
    return set_feature_layers(model, [], "kd_embedding")


def _config(config: dict[str, Any]):
    try:
        from transformers import AutoConfig
    except ImportError:
        raise KdError(f"arch=hf needs the transformers package: {INSTALL}") from None
    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise KdError("the model's config has no model_type; give the config.json that save_pretrained wrote")
    for key in ("id2label", "label2id", "num_labels"):  # the data set decides the classes
        fields.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as error:
        raise KdError(
            f"transformers does not know model_type '{model_type}' ({str(error).splitlines()[0][:120]}); "
            "upgrade transformers or check config.json"
        ) from None


def _fixed_size(hf_config) -> int | None:
    """The image side a model with position embeddings over a fixed patch grid needs (ViT-like)."""
    if not hasattr(hf_config, "patch_size") or not hasattr(hf_config, "image_size"):
        return None
    if "vit" not in hf_config.model_type and "deit" not in hf_config.model_type and "beit" not in hf_config.model_type:
        return None
    size = hf_config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def config_labels(config: dict[str, Any]) -> list[str] | None:
    """The class names a config.json lists (id2label), None when they are transformers' placeholders."""
    labels = config.get("id2label") or {}
    names = [labels[key] for key in sorted(labels, key=lambda k: int(k))]
    if not names or all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    return names
