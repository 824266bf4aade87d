"""The model registry: `@register_model` on a builder, `create_model` as the one door.

A builder is `fn(num_classes, in_channels, input_size, **options) -> nn.Module`; its keyword
options are what a config may set under `teacher.kwargs` / `student.kwargs`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from kd_cli.registry import Registry

MODELS = Registry("model")


def register_model(name: str | None = None) -> Callable[[Callable], Callable]:
    return MODELS.register(name)


def list_models() -> list[str]:
    return MODELS.names()


def create_model(
    name: str, num_classes: int, in_channels: int = 3, input_size: int = 32, **options: Any
) -> nn.Module:
    fixed = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    model = MODELS.build(name, fixed, options)
    model.kd_input_shape = (in_channels, input_size, input_size)  # for dry runs that size adapters
    return model
