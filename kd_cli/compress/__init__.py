"""Compression steps for `kd compress`: one file each, registered by name.

A step is a class whose keyword arguments are its options (configs/compression/*.yaml hold their
values). `apply(model, ctx)` returns the compressed model and appends a JSON-able record to
`ctx.transforms`; `rebuild(model, record)` redoes the *structure* of that change on a freshly
built network, so a saved compressed model is rebuilt from model.json + safetensors alone (no
pickled code). `finetune` is not a step class: it is the training loop itself (see the stage).

To add a step: write `kd_cli/compress/mine.py` with a `@register_step("mine")` class and a section
`mine:` with its options in configs/compression/base.yaml. Every module here is imported automatically.
"""

from __future__ import annotations

import importlib
import pkgutil
import types
import typing
from typing import Any

from torch import nn

from kd_cli.errors import KdError
from kd_cli.registry import Registry

STEPS = Registry("compression step")
FINETUNE = "finetune"


def register_step(name: str):
    def add(cls):
        cls.name = name
        return STEPS.register(name)(cls)

    return add


def build_step(name: str, options: dict[str, Any]):
    check_types(name, options)
    return STEPS.build(name, {}, options)


def check_types(name: str, options: dict[str, Any]) -> None:
    """The step's annotations are its schema (the `compression` node is open): a wrong type is a
    one-line error naming the key, as Hydra gives for typed config nodes."""
    hints = typing.get_type_hints(STEPS.get(name).__init__)
    for key, value in options.items():
        wanted = hints.get(key)
        if wanted is None:
            continue
        allowed = typing.get_args(wanted) if typing.get_origin(wanted) in (typing.Union, types.UnionType) else (wanted,)
        if not any(_fits(value, kind) for kind in allowed):
            names = " or ".join("null" if k is type(None) else getattr(k, "__name__", str(k)) for k in allowed)
            raise KdError(f"compression.{name}.{key}={value!r} must be {names}")


def _fits(value: Any, kind: Any) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(kind) or kind)


def rebuild(model: nn.Module, transforms: list[dict[str, Any]]) -> nn.Module:
    """Apply the structural part of every saved transform, in order, to a freshly built model."""
    for record in transforms:
        kind = record.get("kind", "?") if isinstance(record, dict) else "?"
        try:
            model = STEPS.get(kind).rebuild(model, record)
        except KdError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
            raise KdError(f"model.json's '{kind}' record does not fit the rebuilt {type(model).__name__} "
                          f"({type(error).__name__}: {error}); was model.json edited, or written for another "
                          f"model?") from None
    return model


def is_int8(extra: dict[str, Any]) -> bool:
    """True when a saved model's `extra` (model.json) records the int8 step: it loads as a CPU model."""
    return any(isinstance(t, dict) and t.get("kind") == "quantize_int8" for t in extra.get("transforms") or [])


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("context", "layers", "measure", "qstate"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
