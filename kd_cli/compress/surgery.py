"""Module surgery shared by the steps: find layers by name, replace them, record and restore shapes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from kd_cli.errors import KdError

# Constructor attributes that carry a layer's width; pruning changes them and load restores them.
SHAPE_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "num_channels",
    "num_groups",
    "normalized_shape",
    "num_parameters",
    "embedding_dim",
    "num_embeddings",
)
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def layer_map(model: nn.Module | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """{name: module} of a model (its named_modules), or such a mapping as it is (see compress.check_steps)."""
    return dict(model) if isinstance(model, Mapping) else dict(model.named_modules())


def check_layers(
    layers: Mapping[str, nn.Module], names: Iterable[str], option: str, kinds: tuple[type, ...] = (), handles: str = ""
) -> None:
    """Each of `names`, the value of the option `option`, is a layer of the model (`layers`: its
    layer_map) and, with `kinds`, one of those types (`handles` says which, for the message); else a
    one-line KdError naming the option and the name."""
    for name in names:
        if not name or name not in layers:
            close = [n for n in layers if n and name and (n.startswith(name) or name in n)][:5]
            hint = f"; e.g. {', '.join(close)}" if close else f"; layers include {', '.join(list(layers)[1:6])}, ..."
            raise KdError(f"{option}: the model has no layer '{name}'{hint}")
        if kinds and not isinstance(layers[name], kinds):
            inside = [n for n, m in layers.items() if n.startswith(f"{name}.") and isinstance(m, kinds)]
            hint = f" (inside it: {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''})" if inside else ""
            raise KdError(f"{option}: layer '{name}' is a {type(layers[name]).__name__}; {handles}{hint}")


def tensor_shapes(model: nn.Module) -> dict[str, dict[str, list[int]]]:
    """{module name: {parameter or buffer name: shape}} for the tensors each module owns directly."""
    shapes = {}
    for name, module in model.named_modules():
        own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        shapes[name] = {key: list(t.shape) for key, t in own.items() if t is not None}
    return shapes


def changed_layers(before: dict[str, dict[str, list[int]]], model: nn.Module) -> dict[str, dict[str, Any]]:
    """The layers whose tensors changed shape, with their new widths and tensor shapes (JSON-able)."""
    after = tensor_shapes(model)
    modules = dict(model.named_modules())
    changed = {}
    for name, shapes in after.items():
        if shapes != before.get(name):
            module = modules[name]
            attrs = {a: _jsonable(getattr(module, a)) for a in SHAPE_ATTRS if hasattr(module, a)}
            changed[name] = {"type": type(module).__name__, "attrs": attrs, "tensors": shapes}
    return changed


def resize_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> nn.Module:
    """Give each listed layer its recorded widths and empty tensors of the recorded shapes
    (the weights that fill them come from the safetensors file)."""
    for name, record in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KdError(
                f"the saved pruned layer '{name}' is not in the rebuilt model; model.json does not "
                f"match this version of the architecture"
            ) from None
        for attr, value in record["attrs"].items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        for key, shape in record["tensors"].items():
            old = getattr(module, key)
            empty = torch.empty(shape, dtype=old.dtype)
            if isinstance(old, nn.Parameter):
                setattr(module, key, nn.Parameter(empty, requires_grad=old.requires_grad))
            else:
                module._buffers[key] = empty
    return model


def classifier_name(model: nn.Module, example: torch.Tensor) -> str | None:
    """The layer whose output is the model's output (the classifier), found by running the model; for a
    model that resizes its logits, the last layer with the output's channel count."""
    outputs: list[tuple[torch.Tensor, str]] = []  # references kept: ids of freed tensors are reused

    def remember(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output stays as it is
            outputs.append((output, name))

        return hook

    hooks = [m.register_forward_hook(remember(n)) for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    try:
        with torch.no_grad():
            result = model(example)
    finally:
        for hook in hooks:
            hook.remove()
    exact = next((name for output, name in reversed(outputs) if output is result), None)
    if exact is not None or not isinstance(result, torch.Tensor) or result.dim() < 2:
        return exact
    # A segmenter resizes its classifier's logits to the input's size after the layer: the classifier is
    # then the last layer that gives as many channels as the model's output has classes.
    classes = result.shape[1]
    return next((name for output, name in reversed(outputs) if output.dim() >= 2 and output.shape[1] == classes), None)


def weight_sparsity(model: nn.Module) -> float:
    """Share of exact zeros among the weights of conv and linear layers (int8 ones dequantised), in %."""
    zeros = total = 0
    for key, value in model.state_dict().items():
        tensors = value if isinstance(value, tuple) else (value,)
        for tensor in tensors:
            if (
                not isinstance(tensor, torch.Tensor)
                or tensor.dim() < 2
                or not key.split(".")[-1].startswith(("weight", "_packed"))
            ):
                continue
            dense = tensor.int_repr().float() - _zero_points(tensor) if tensor.is_quantized else tensor
            zeros += int((dense == 0).sum())
            total += dense.numel()
    return 100.0 * zeros / total if total else 0.0


def _zero_points(tensor: torch.Tensor) -> torch.Tensor | float:
    if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        shape = [1] * tensor.dim()
        shape[tensor.q_per_channel_axis()] = -1
        return tensor.q_per_channel_zero_points().float().reshape(shape)
    return float(tensor.q_zero_point())


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
