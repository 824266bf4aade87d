"""Distillation methods: one file each, registered by name; `method=NAME` picks one.

To add a method: write `kd_cli/methods/mine.py` with a `@register_method("mine")` Distiller
subclass whose keyword arguments are its options, and `configs/method/mine.yaml` with `name: mine`
and a value for each option. Every module in this package is imported automatically.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Mapping

from torch import nn

from kd_cli.methods.base import Distiller
from kd_cli.registry import Registry

METHODS = Registry("method")


def register_method(name: str):
    return METHODS.register(name)


def build_method(cfg: Mapping[str, Any], student: nn.Module, teacher: nn.Module | None,
                 num_samples: int | None = None) -> Distiller:
    """`num_samples` (the training split's size) is passed to methods that take it (CRD's memory)."""
    options = {k: v for k, v in cfg.items() if k != "name"}
    fixed: dict[str, Any] = {"student": student, "teacher": teacher}
    if "num_samples" in inspect.signature(METHODS.get(cfg["name"])).parameters:
        fixed["num_samples"] = num_samples
    return METHODS.build(cfg["name"], fixed, options)


def method_requires_teacher(name: str) -> bool:
    return METHODS.get(name).requires_teacher


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()

__all__ = ["METHODS", "Distiller", "build_method", "method_requires_teacher", "register_method"]
