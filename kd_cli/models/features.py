"""Reading intermediate features by module name, through forward hooks.

Feature-distillation methods need a model's stage outputs and its embedding. Rather than a
`forward(x, is_feat=True)` protocol that every architecture must implement, every builder names
those modules (`set_feature_layers`), and `FeatureTap` hooks them, so a method works on any
`nn.Module` (including torchvision's, unchanged) and a user may tap any other module by name.

Caveat: a hooked output is the tensor the module returned, not a copy. A later in-place op on
that very tensor would change what the tap holds; the zoo here avoids in-place ops on stage outputs.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

import torch
from torch import nn

from kd_cli.errors import KdError


def set_feature_layers(model: nn.Module, stages: Iterable[str], embedding: str) -> nn.Module:
    """Record which modules give the stage outputs (shallow to deep) and the pooled embedding."""
    stages = list(stages)
    resolve_modules(model, [*stages, embedding])  # a builder naming a missing module is a bug: fail early
    model.kd_feature_layers = stages
    model.kd_embedding_layer = embedding
    return model


def resolve_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Map names to modules; an unknown name is a KdError listing the closest module names."""
    modules = dict(model.named_modules())
    resolved = {}
    for name in names:
        if name not in modules:
            raise _unknown_layer(model, name, modules)
        resolved[name] = modules[name]
    return resolved


def _unknown_layer(model: nn.Module, name: str, modules: dict[str, nn.Module]) -> KdError:
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    stages = getattr(model, "kd_feature_layers", None)
    known = f" (this model's stages: {', '.join(stages)})" if stages else ""
    return KdError(
        f"no module named '{name}' in {type(model).__name__}{hint}{known}; "
        f"use a name from model.named_modules()"
    )


def _detach(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(_detach(o) for o in output)
    return output


class FeatureTap:
    """Collect the outputs of named modules during forward passes.

    >>> with FeatureTap(teacher, teacher.kd_feature_layers, detach=True) as tap:
    ...     logits = teacher(x)
    ...     feats = [tap.outputs[n] for n in teacher.kd_feature_layers]

    `detach=True` stores detached tensors, so a teacher's features carry no autograd graph.
    The hooks stay until `remove()` (or the end of the `with` block; `outputs` of the last pass
    stay readable after it). Each forward pass overwrites `outputs`; `clear()` empties it, so
    a step can drop its references to the previous step's activations.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], detach: bool = False):
        self.names = list(dict.fromkeys(names))  # drop repeats: one hook per module
        self.detach = detach
        self.outputs: dict[str, Any] = {}
        modules = resolve_modules(model, self.names)
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def store(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[name] = _detach(output) if self.detach else output

        return store

    def clear(self) -> None:
        self.outputs = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def feature_shapes(
    model: nn.Module, names: Iterable[str], in_channels: int, input_size: int
) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of each named module (batch dimension dropped), e.g. (C, H, W).

    Found by a dry run on two zero images in eval mode without gradients (two, because some
    layers reject a batch of one); each module's train/eval state is restored afterwards.
    """
    names = list(names)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    states = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with FeatureTap(model, names, detach=True) as tap, torch.no_grad():
            model(torch.zeros(2, in_channels, input_size, input_size, device=device, dtype=dtype))
            missing = [name for name in names if name not in tap.outputs]
            if missing:
                raise KdError(f"module(s) {', '.join(missing)} did not run in {type(model).__name__}.forward; "
                              f"tap modules that the forward pass uses")
            return {name: tuple(tap.outputs[name].shape[1:]) for name in names}
    finally:
        for module, training in states.items():
            module.training = training


def classifier_module(model: nn.Module) -> nn.Module | None:
    """The layer that maps the embedding to class scores: timm's `get_classifier()`, else the last Linear."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter) and isinstance(getter(), nn.Module):
        return getter()
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of `model` but its classifier's (fine-tuning gives those their own rate)."""
    classifier = classifier_module(model)
    head = {id(p) for p in classifier.parameters()} if classifier is not None else set()
    return [p for p in model.parameters() if id(p) not in head]


class Embedding(nn.Identity):
    """Passes the classifier's input through, so a forward hook on this module reads the embedding."""

    def before_classifier(self, module: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])


def tap_classifier_input(model: nn.Module, classifier: nn.Module | None) -> str:
    """Add `model.kd_embedding`, called on the classifier's input by a pre-hook: a module whose output is
    the embedding, for networks built elsewhere (timm, transformers) whose state dict keys must not
    change. The hook is a bound method of that submodule, so copy.deepcopy keeps it pointing at the copy's."""
    if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
        raise KdError(f"{type(model).__name__} has no classifier module to read the embedding from")
    model.kd_embedding = Embedding()
    classifier.register_forward_pre_hook(model.kd_embedding.before_classifier)
    return "kd_embedding"
