"""Structured (channel) pruning with Torch-Pruning's dependency graph (Fang et al., DepGraph, CVPR 2023).

Removing an output channel of a conv also removes the matching BatchNorm entries, the input
channels of every layer that reads it, and the same channel of every branch joined to it by a
residual add; Torch-Pruning finds those groups by tracing the model. The pruned network really is
smaller: its new layer widths go into model.json and load rebuilds them (layers.resize_layers).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kd_cli.compress import register_step
from kd_cli.compress.context import StepContext
from kd_cli.compress.step import CompressionStep
from kd_cli.compress.surgery import (
    WEIGHTED,
    changed_layers,
    check_layers,
    classifier_name,
    layer_map,
    resize_layers,
    tensor_shapes,
)
from kd_cli.errors import KdError
from kd_cli.registry import OpenFraction, PositiveInt

log = logging.getLogger("kd")


@register_step("prune_structured")
class PruneStructured(CompressionStep):
    """ratio: share of channels removed (per layer for `uniform`, over the whole net for `global`);
    importance: magnitude (L2 norm of a channel's weights), bn_scale (|gamma| of its BatchNorm,
    Liu et al. 2017), taylor (|weight x gradient| on training batches, Molchanov et al. 2019) or
    random; ignored_layers: names kept whole (the classifier always is)."""

    # ratio and max_layer_ratio below 1: no layer may lose every channel
    def __init__(
        self,
        ratio: OpenFraction,
        importance: Literal["magnitude", "bn_scale", "taylor", "random"],
        scope: Literal["uniform", "global"],
        ignored_layers: list[str],
        iterative_steps: PositiveInt,
        round_to: PositiveInt | None,
        max_layer_ratio: OpenFraction,
        taylor_batches: PositiveInt,
    ):
        self.ratio, self.importance, self.scope = ratio, importance, scope
        self.ignored_layers = list(ignored_layers)
        self.iterative_steps, self.round_to = iterative_steps, round_to
        self.max_layer_ratio, self.taylor_batches = max_layer_ratio, taylor_batches

    def check(self, model: nn.Module | Mapping[str, nn.Module]) -> None:
        """What can be checked before pruning (see compress.check_steps): the ignored layers exist, and
        importance=bn_scale has BatchNorm layers to score. (Whether Torch-Pruning can trace the model,
        and what it removes, is known only by pruning.)"""
        layers = layer_map(model)
        check_layers(layers, self.ignored_layers, "compression.prune_structured.ignored_layers")
        if self.importance == "bn_scale" and not any(isinstance(m, _BatchNorm) for m in layers.values()):
            raise KdError(
                "compression.prune_structured.importance=bn_scale needs BatchNorm layers and this model "
                "has none; use importance=magnitude or taylor"
            )

    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        import torch_pruning as tp

        self.check(model)
        model.eval()
        kept_whole: list[str]
        if is_detector(model):  # the backbone alone is traced: see backbone_of
            traced, example, kept_whole = backbone_of(model, ctx.example)
        else:
            classifier = classifier_name(model, ctx.example)
            traced, example, kept_whole = model, ctx.example, [classifier] if classifier else []
        ignored = {*self.ignored_layers, *kept_whole}
        before = tensor_shapes(model)
        try:
            pruner = tp.pruner.MetaPruner(
                traced,
                example,
                importance=self._criterion(tp),
                global_pruning=self.scope == "global",
                pruning_ratio=self.ratio,
                max_pruning_ratio=self.max_layer_ratio,
                iterative_steps=self.iterative_steps,
                round_to=self.round_to,
                ignored_layers=[model.get_submodule(name) for name in sorted(ignored)],
                # (a detector's ignored layers outside its backbone are not in the traced graph: no effect)
            )
            for _ in range(self.iterative_steps):
                if self.importance == "taylor":
                    self._accumulate_gradients(model, ctx)
                pruner.step()
        except (RuntimeError, ValueError, ZeroDivisionError, IndexError, KeyError) as error:
            # e.g. ShuffleNet's channel shuffle (a reshape across groups) defeats the dependency graph
            raise KdError(
                f"Torch-Pruning cannot prune this {type(model).__name__} ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:120] if str(error) else 'no message'}); use lowrank, "
                f"prune_unstructured or quantize_int8, or list the failing block in ignored_layers"
            ) from None
        model.zero_grad(set_to_none=True)
        layers = changed_layers(before, model)
        if not layers:
            raise KdError(
                "compression.prune_structured removed no channel: every prunable layer is ignored or "
                "too narrow; lower ignored_layers or raise ratio"
            )
        self._check_widths(model)
        log.info(f"prune_structured: {len(layers)} layers resized (ignored: {', '.join(sorted(ignored)) or 'none'})")
        ctx.record(kind=self.name, ratio=self.ratio, importance=self.importance, scope=self.scope, layers=layers)
        return model

    @staticmethod
    def rebuild(model: nn.Module, record: dict) -> nn.Module:
        return resize_layers(model, record["layers"])

    def _criterion(self, tp):
        if self.importance == "magnitude":
            return tp.importance.GroupMagnitudeImportance(p=2)
        if self.importance == "bn_scale":
            return tp.importance.BNScaleImportance()
        if self.importance == "taylor":
            return tp.importance.GroupTaylorImportance()
        return tp.importance.RandomImportance()

    def _accumulate_gradients(self, model: nn.Module, ctx: StepContext) -> None:
        """Gradients of the training loss (eval mode: BatchNorm statistics stay as trained)."""
        model.zero_grad(set_to_none=True)
        for images, targets in ctx.batches(self.taylor_batches):
            ctx.loss(model(images), targets).backward()

    @staticmethod
    def _check_widths(model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, WEIGHTED) and module.weight.numel() == 0:
                raise KdError(
                    f"compression.prune_structured removed every channel of {name}; lower ratio or "
                    f"max_layer_ratio, or add it to ignored_layers"
                )


def is_detector(model: nn.Module) -> bool:
    """kd's detector wrapper (models/detection.py) around a torchvision detector with a backbone."""
    return hasattr(model, "detector") and hasattr(model.detector, "backbone")


def backbone_of(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, torch.Tensor, list[str]]:
    """A detector is pruned in its backbone's body: the backbone is traced on the input it sees (captured
    from a run of the whole detector on `example`: padded, channels repeated), and its FPN is kept whole, so
    the levels the heads (and the distillation methods) read keep their widths; the FPN's lateral convs
    lose the input channels the body loses. The post-processing after the heads (top-k, NMS) is never
    traced. A detector without an FPN (SSDlite: its heads read the body directly) is refused."""
    backbone = cast(nn.Module, cast(nn.Module, model.detector).backbone)
    fpn = getattr(backbone, "fpn", None)
    if fpn is None:
        raise KdError(
            f"compression.prune_structured prunes a detector's backbone under its FPN, and "
            f"{type(model.detector).__name__}'s backbone has none; use lowrank or prune_unstructured"
        )
    assert isinstance(fpn, nn.Module)
    seen: list[torch.Tensor] = []
    hook = backbone.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    try:
        with torch.no_grad():
            model(example)
    finally:
        hook.remove()
    prefix = next(name for name, module in model.named_modules() if module is fpn)
    kept = [
        f"{prefix}.{name}" if name else prefix for name, module in fpn.named_modules() if isinstance(module, WEIGHTED)
    ]
    return backbone, seen[0], kept
