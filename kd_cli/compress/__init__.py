"""Compression steps for `kd compress`: one file each, registered by name.

A step is a CompressionStep subclass (compress/step.py: the contract, checked by mypy and at
registration) whose keyword arguments are its options (configs/compression/*.yaml hold their
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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from kd_cli.compress.qstate import LAYOUT_KEY, decode, encode, needs_encoding
from kd_cli.compress.step import CompressionStep
from kd_cli.registry import Registry, import_submodules
from kd_cli.saved_forms import StateCodec, register_codec, register_transform


def _record_rebuild(name: str, step: Callable) -> None:
    """A step is a CompressionStep; its `rebuild` (the structure it leaves, redone on a fresh network when
    a saved model is loaded) goes to kd_cli/saved_forms, which the artifact loader reads."""
    if not (isinstance(step, type) and issubclass(step, CompressionStep)):
        raise TypeError(f"compression step '{name}' must derive from kd_cli.compress.step.CompressionStep")
    register_transform(name, step.rebuild, cpu_only=step.cpu_only)


STEPS = Registry("compression step", name_attribute="name", on_register=_record_rebuild)
register_step = STEPS.register
FINETUNE = "finetune"


def build_step(name: str, options: dict[str, Any]) -> CompressionStep:
    """The step with its options checked by name, type and range (its annotations are its schema)."""
    return STEPS.build(name, {}, options, path=f"compression.{name}")


def check_steps(model: nn.Module, steps: Iterable[tuple[str, CompressionStep | None]]) -> None:
    """Every planned step's `check` on the loaded, uncompressed model, in order, before anything is
    written or compressed. `steps` is the stage's plan: (name, step), finetune as (name, None). A step
    that renames layers (lowrank: X becomes X.0 and X.1) tells the later ones the names they will see."""
    layers: Mapping[str, nn.Module] = dict(model.named_modules())
    for _, step in steps:
        if step is None:
            continue
        step.check(layers)
        layers = step.layers_after(layers)


def is_int8(extra: dict[str, Any]) -> bool:
    """True when a saved model's `extra` (model.json) records the int8 step: it loads as a CPU model."""
    return any(isinstance(t, dict) and t.get("kind") == "quantize_int8" for t in extra.get("transforms") or [])


register_codec(StateCodec(LAYOUT_KEY, needs_encoding, encode, decode))  # int8 state in plain safetensors


import_submodules(__name__, __path__)
