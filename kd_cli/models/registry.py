"""The model registry: `@register_model` on a builder, `create_model` as the one door.

A builder is `fn(num_classes, in_channels, input_size, **options) -> nn.Module`; its keyword
options are what a config may set under `teacher.kwargs` / `student.kwargs`, and their annotations
(`PositiveInt`, `Dropout`, `Literal[...]`, ...) are their types and ranges: `check_model_options`
checks them before any data is read, `create_model` again when it builds. What needs the data set
(`num_classes`, `in_channels`, `input_size`: the fixed arguments) is checked by the builder itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from torch import nn

from kd_cli.registry import Registry

MODELS = Registry("model")
FIXED = ("num_classes", "in_channels", "input_size")  # from the data set, not options


def register_model(name: str | None = None) -> Callable[[Callable], Callable]:
    return MODELS.register(name)


def list_models() -> list[str]:
    return MODELS.names()


def check_model_options(arch: str, kwargs: Mapping[str, Any], path: str = "") -> None:
    """The model's options by name, type and range, without building it (`path`: where they sit in
    the config, e.g. `student.kwargs`, for messages naming the key as typed). An OmegaConf node is
    taken as its plain container (a ListConfig is not a list to the type checks)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(kwargs, DictConfig):
        kwargs = cast("dict[str, Any]", OmegaConf.to_container(kwargs, resolve=True))
    MODELS.check(arch, kwargs, fixed=FIXED, path=path)


def create_model(name: str, num_classes: int, in_channels: int = 3, input_size: int = 32, **options: Any) -> nn.Module:
    """The registered model `name` for `num_classes` classes of `in_channels` x `input_size`² images, its
    `options` checked against the builder's signature (a one-line KdError names a wrong one). The model
    records its input shape and class count (`kd_input_shape`, `kd_num_classes`) for the dry runs that
    size feature adapters; every builder names its stages and embedding (`set_feature_layers`)."""
    fixed = dict(zip(FIXED, (num_classes, in_channels, input_size)))
    model = MODELS.build(name, fixed, options)
    model.kd_input_shape = (in_channels, input_size, input_size)  # for dry runs that size adapters
    model.kd_num_classes = num_classes
    return model


def model_task(name: str) -> str:
    """The task a registered model serves (its builder's `task` attribute; classification when unset)."""
    return getattr(MODELS.get(name), "task", "classification")
