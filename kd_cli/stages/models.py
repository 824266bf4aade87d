"""What a stage knows of models: the description of a model to build (its config, the data's classes,
channels and size), its parameter count, and the checks that a saved model fits the data it is given."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import kd_cli.compress  # noqa: F401  (registers how a compressed model is rebuilt: kd_cli/saved_forms)
from kd_cli.engine.artifacts import ModelSpec
from kd_cli.errors import KdError, warn


def options_with_defaults(model_cfg: DictConfig) -> dict:
    """Every option of the model, the builder's defaults filled in: `teacher=default` with `{}` and
    `teacher=cnn` with `{width: 32, ...}` describe the same network, and model.json says so."""
    from kd_cli.model_index import model_options as defaults
    from kd_cli.models import MODELS

    given = cast("dict[str, Any]", OmegaConf.to_container(model_cfg.kwargs, resolve=True))
    return {**defaults(MODELS.get(model_cfg.arch)), **given}


def model_spec(model_cfg: DictConfig, data, dataset_cfg: DictConfig) -> ModelSpec:
    extra = {"crop_fraction": dataset_cfg.crop_fraction} if "crop_fraction" in dataset_cfg else {}
    ids = getattr(data, "category_ids", None)
    if ids and list(ids) != list(range(len(ids))):  # a COCO file's ids with gaps: kd predict's results use them
        extra["category_ids"] = list(ids)
    return ModelSpec(
        arch=model_cfg.arch,
        kwargs=options_with_defaults(model_cfg),
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        input_size=data.input_size,
        mean=list(dataset_cfg.mean),
        std=list(dataset_cfg.std),
        class_names=list(data.class_names),
        dataset=dataset_cfg.name,
        # how an image file becomes this model's input (kd predict): the evaluation crop of image folders
        extra=extra,
    )


def count_parameters(model: nn.Module) -> int:
    """Weights and biases; int8 weights too (torch.ao packs those into buffers, not parameters)."""
    stored = [
        t
        for v in model.state_dict().values()
        for t in (v if isinstance(v, tuple) else (v,))
        if isinstance(t, torch.Tensor)
    ]
    if not any(t.is_quantized for t in stored):
        return sum(p.numel() for p in model.parameters())
    return sum(t.numel() for t in stored if t.is_quantized or isinstance(t, nn.Parameter))


def check_channels(mean: list, std: list, in_channels: int) -> None:
    if len(mean) != in_channels or len(std) != in_channels:
        raise KdError(
            f"dataset.mean/std have {len(mean)}/{len(std)} values but the images have {in_channels} channel(s)"
        )


def check_model_fits(
    spec: ModelSpec,
    data,
    path: Path,
    role: str,
    normalisation: tuple | None = None,
    same_size: bool = False,
    converted: bool = False,
) -> None:
    """Refuse a saved model whose outputs mean other classes than this data set's (count, names or
    order) or that takes other channels; a model that saw other image sizes is refused with
    `same_size`, else warned about, like one trained with another normalisation (`normalisation`:
    this run's (mean, std)). `converted`: the model gets the images in its own form (a teacher, see
    models/input_form.py), so another size or normalisation is only noted, and grey data may feed an
    RGB model."""
    from kd_cli.models import model_task
    from kd_cli.models.input_form import can_convert

    if model_task(spec.arch) != data.task:
        raise KdError(
            f"{role} {path} is a {model_task(spec.arch)} model ({spec.arch}) but this data set is {data.task}; "
            f"give a {data.task} {role}, or a {model_task(spec.arch)} data set"
        )
    channels_fit = (
        can_convert(data.in_channels, spec.in_channels) if converted else spec.in_channels == data.in_channels
    )
    if spec.num_classes != data.num_classes or not channels_fit:
        raise KdError(
            f"{role} {path} was trained for {spec.num_classes} classes and {spec.in_channels} channel(s) "
            f"({spec.dataset}) but this data set has {data.num_classes} and {data.in_channels}; give a "
            f"{role} trained on it, or the data set it was trained on"
        )
    if list(spec.class_names) != list(data.class_names):
        odd = next(((a, b) for a, b in zip(spec.class_names, data.class_names) if a != b), ("?", "?"))
        raise KdError(
            f"{role} {path} was trained for other classes ({spec.dataset}: class '{odd[0]}' where this "
            f"data set has '{odd[1]}'); its outputs would be read as the wrong classes: give a {role} "
            f"trained on these classes, in this order, or the data set it was trained on"
        )
    if converted:
        return
    if spec.input_size != data.input_size:
        message = f"{role} {path} was trained on {spec.input_size}px images, this data set has {data.input_size}px"
        fix = (
            f"dataset.image_size={spec.input_size}"
            if "image_size" in dataset_options_of(spec)
            else "the data set it was trained on"
        )
        if same_size:
            raise KdError(f"{message}; pass {fix}")
        warn(f"{message}; pass {fix} to feed it as it was trained")
    if normalisation is not None and not (_close(spec.mean, normalisation[0]) and _close(spec.std, normalisation[1])):
        warn(
            f"{role} {path} was trained on images normalised with mean {spec.mean} / std {spec.std}, this run "
            f"normalises with {list(normalisation[0])} / {list(normalisation[1])}"
        )


def dataset_options_of(spec: ModelSpec) -> set[str]:
    """The options of the data set a saved model names (empty when it is not registered here)."""
    import inspect

    from kd_cli.data import DATASETS

    try:
        return set(inspect.signature(DATASETS.get(spec.dataset)).parameters)
    except KdError:
        return set()


def check_pretrained_form(model: nn.Module, dataset_cfg: DictConfig, role: str) -> None:
    """Pretrained weights expect their own normalisation (timm's resolve_data_config): a run that
    normalises otherwise starts them on inputs they never saw, so say which values to set."""
    form = getattr(model, "kd_pretrained_form", None)
    if not form:
        return
    mean, std = list(dataset_cfg.mean), list(dataset_cfg.std)
    channels = len(mean)
    expected_mean, expected_std = form["mean"][:channels], form["std"][:channels]
    if not (_close(mean, expected_mean) and _close(std, expected_std)):
        shown = lambda values: "[" + ",".join(f"{v:.4g}" for v in values) + "]"  # noqa: E731
        warn(
            f"the {role}'s pretrained weights expect images normalised with mean {shown(expected_mean)} / std "
            f"{shown(expected_std)} (timm's data config) and this run uses {shown(mean)} / {shown(std)}: set "
            f"dataset.mean={shown(expected_mean)} dataset.std={shown(expected_std)} unless that is intended"
        )


def _close(a: list, b: list) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))
