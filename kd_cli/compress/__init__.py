"""Compression steps for `kd compress`: one file each, registered by name.

A step is a class whose keyword arguments are its options (configs/compression/*.yaml hold their
values). `apply(model, ctx)` returns the compressed model and appends a JSON-able record to
`ctx.transforms`; `rebuild(model, record)` redoes the *structure* of that change on a freshly
built network, so a saved compressed model is rebuilt from model.json + safetensors alone (no
pickled code). `finetune` is not a step class: it is the training loop itself (see the stage).

`check(model)` checks, without compressing, everything the step can know from the loaded model
(the layers its options name exist and are of a kind it handles, something is left to compress, ...)
and raises the same one-line KdErrors `apply` would (`apply` runs it first: each rule lives once).
`check_steps` runs it for every planned step before the run starts; `model` may also be the mapping
{layer name: module} that a step which renames layers (`layers_after`: lowrank) hands the next ones.

To add a step: write `kd_cli/compress/mine.py` with a `@register_step("mine")` class and a section
`mine:` with its options in configs/compression/base.yaml. Every module here is imported automatically.
The constructor's annotations are the options' types and ranges (`ratio: OpenFraction`,
`scope: Literal[...]`, see kd_cli/registry.py; a `validate_options` static method for rules that tie
options together or depend on this machine): `build_step` checks them, before any model is loaded.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Iterable

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
    """The step with its options checked by name, type and range (its annotations are its schema)."""
    return STEPS.build(name, {}, options, path=f"compression.{name}")


def check_steps(model: nn.Module, steps: Iterable[tuple[str, Any]]) -> None:
    """Every planned step's `check` on the loaded, uncompressed model, in order, before anything is
    written or compressed. `steps` is the stage's plan: (name, step), finetune as (name, None). A step
    that renames layers (lowrank: X becomes X.0 and X.1) tells the later ones the names they will see."""
    layers = dict(model.named_modules())
    for _, step in steps:
        if step is None:
            continue
        if hasattr(step, "check"):
            step.check(layers)
        if hasattr(step, "layers_after"):
            layers = step.layers_after(layers)


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
        if info.name not in ("context", "layers", "qstate"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
