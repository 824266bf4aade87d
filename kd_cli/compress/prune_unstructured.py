"""Unstructured magnitude pruning (Han et al., 2015): zero the smallest weights of conv and linear layers.

The masks stay attached (torch.nn.utils.prune) through the recovery `finetune`, so the zeros stay
zero while the rest learns; `make_permanent` folds them into plain weights before saving. Zeros
do not shrink a dense file or speed up dense kernels: kd reports the sparsity, not a smaller size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

from torch import nn
from torch.nn.utils import prune

from kd_cli.compress import register_step
from kd_cli.compress.context import StepContext
from kd_cli.compress.step import CompressionStep
from kd_cli.compress.surgery import WEIGHTED, check_layers, layer_map, weight_sparsity
from kd_cli.errors import KdError
from kd_cli.registry import OpenFraction

log = logging.getLogger("kd")


@register_step("prune_unstructured")
class PruneUnstructured(CompressionStep):
    """sparsity: share of the weights set to zero, chosen over all layers together (`global`: the
    smallest |w| of the whole net) or per layer (`layer`); skip: layer names left dense."""

    def __init__(self, sparsity: OpenFraction, scope: Literal["global", "layer"], skip: list[str]):
        self.sparsity, self.scope, self.skip = sparsity, scope, list(skip)

    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        self.check(model)
        targets = self._targets(layer_map(model))
        if self.scope == "global":
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=self.sparsity)
        else:
            for module, name in targets:
                prune.l1_unstructured(module, name, amount=self.sparsity)
        log.info(f"prune_unstructured: {len(targets)} layers, {weight_sparsity(model):.1f}% of weights zero")
        ctx.record(kind=self.name, sparsity=self.sparsity, scope=self.scope)
        return model

    def check(self, model: nn.Module | Mapping[str, nn.Module]) -> None:
        """What can be checked before pruning (see compress.check_steps): the skipped layers are conv or
        linear layers of the model, and some layer is left to prune."""
        layers = layer_map(model)
        check_layers(
            layers,
            self.skip,
            "compression.prune_unstructured.skip",
            WEIGHTED,
            "it prunes (and skips) conv and linear layers, by their own names",
        )
        self._targets(layers)

    def _targets(self, layers: Mapping[str, nn.Module]) -> list[tuple[nn.Module, str]]:
        targets: list[tuple[nn.Module, str]] = [
            (m, "weight") for n, m in layers.items() if isinstance(m, WEIGHTED) and n not in self.skip
        ]
        if not targets:
            raise KdError("compression.prune_unstructured: no conv or linear layer left to prune (all skipped)")
        return targets

    @staticmethod
    def rebuild(model: nn.Module, record: dict) -> nn.Module:
        return model  # the zeros are in the saved weights; the structure is unchanged


def copyable(model: nn.Module) -> nn.Module:
    """Let copy.deepcopy through a masked model: the cached `weight = weight_orig * mask` is a non-leaf
    tensor deepcopy refuses; a detached cache is equal, and the next forward recomputes it anyway."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                setattr(module, hook._tensor_name, getattr(module, hook._tensor_name).detach())
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold pruning masks into plain weights (weight_orig * mask -> weight), in place."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model
