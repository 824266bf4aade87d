"""The contract of a compression step, as `Distiller` is a method's: a class registered with
`@register_step("name")` whose constructor's keyword arguments are its options (their annotations the
types and ranges `build_step` checks, before any model is loaded), deriving from `CompressionStep`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

from torch import nn

from kd_cli.compress.context import StepContext


class CompressionStep(ABC):
    name: str  # the registered name, set by register_step (STEPS' name_attribute)
    cpu_only = False  # True when the step's result runs on the CPU only (int8): a saved model loads there

    @abstractmethod
    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        """The compressed model; appends a JSON-able record of what it did to `ctx.transforms` (model.json
        keeps it, so `rebuild` can redo the structure). Runs `check` first: each rule lives once."""

    @staticmethod
    @abstractmethod
    def rebuild(model: nn.Module, record: dict) -> nn.Module:
        """The structure `apply` left (pruned widths, factorised layers, int8 modules), redone on a freshly
        built network from its record, so a saved compressed model loads from model.json + safetensors
        alone (no pickled code); the weights are then loaded into it."""

    @abstractmethod
    def check(self, model: nn.Module | Mapping[str, nn.Module]) -> None:
        """Everything the step can know before compressing (the layers its options name exist and are of a
        kind it handles, something is left to compress): the one-line KdErrors `apply` would raise. `model`
        may be the mapping {layer name: module} an earlier step that renames layers leaves (layers_after)."""

    def layers_after(self, layers: Mapping[str, nn.Module]) -> Mapping[str, nn.Module]:
        """The layer names the next steps will see (lowrank turns X into X.0 and X.1); unchanged by default."""
        return layers
