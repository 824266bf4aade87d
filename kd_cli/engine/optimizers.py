"""The optimisers `optim.name` picks, registered by name (torch is imported when one is built, so that
checking a config stays torch-free). A builder takes the parameter groups and, by keyword, the options
of configs/optim/NAME.yaml it uses; `fused` is decided by `use_fused` below.

To add one: a function here with `@register_optimizer("name")` and configs/optim/name.yaml holding every
key the other optimisers' files hold (the schedule's among them), its own defaults set."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from kd_cli.errors import KdError
from kd_cli.registry import Registry

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

OPTIMIZERS = Registry("optim.name")
register_optimizer = OPTIMIZERS.register


@register_optimizer("sgd")
def sgd(params: list[Any], *, lr: float, weight_decay: float, momentum: float, nesterov: bool, fused: bool | None):
    """SGD with momentum. Every parameter is decayed, biases and BN scales included, as in the KD literature's
    recipes; Nesterov only with momentum (engine/values.py refuses it without)."""
    import torch

    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, fused=fused
    )
    if fused and momentum > 0:
        _start_momentum(optimizer)
    return optimizer


@register_optimizer("adamw")
def adamw(params: list[Any], *, lr: float, weight_decay: float, betas: list[float], fused: bool | None):
    """AdamW (decoupled weight decay)."""
    import torch

    pair = cast("tuple[float, float]", tuple(betas))  # two: engine/values.py checks optim.betas
    return torch.optim.AdamW(params, lr=lr, betas=pair, weight_decay=weight_decay, fused=fused)


def _start_momentum(optimizer: Any) -> None:
    """Zero momentum buffers for every parameter from the start. torch's fused SGD cannot step when some
    parameters have a buffer and others get their first gradient later (FSP's and other two-phase
    methods' classifier); with dampening 0 a zero buffer gives the same first step as torch's own."""
    import torch

    for group in optimizer.param_groups:
        for parameter in group["params"]:
            optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)


def param_groups(
    params: Iterable[torch.nn.Parameter], backbone: Iterable[torch.nn.Parameter], backbone_lr_scale: float
) -> list[dict]:
    """One group, or (fine-tuning) the `backbone` parameters at `backbone_lr_scale` times the rate and
    the rest (the new classifier, adapters) at the full rate. `lr_scale` is read by `set_lr`."""
    params = list(params)
    if backbone_lr_scale == 1.0:
        return [{"params": params, "lr_scale": 1.0}]
    slow = {id(p) for p in backbone}
    groups = [
        {"params": [p for p in params if id(p) in slow], "lr_scale": float(backbone_lr_scale)},
        {"params": [p for p in params if id(p) not in slow], "lr_scale": 1.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(params: Iterable[torch.nn.Parameter] | list[dict], cfg: DictConfig) -> torch.optim.Optimizer:
    """The optimiser `optim.name` names (engine/optimizers.py), given the options of cfg its builder takes."""
    listed: list[Any] = list(params)
    builder = OPTIMIZERS.get(cfg.name)
    takes = [name for name in inspect.signature(builder).parameters if name not in ("params", "fused")]
    return builder(listed, fused=use_fused(cfg.fused, listed), **{name: cfg[name] for name in takes})


def use_fused(setting: Any, params: list) -> bool | None:
    """`optim.fused`: auto takes the fused kernels (one launch for every parameter: 2.3x faster steps on
    this CPU, fewer launches on a GPU) where torch has them, on CPU and CUDA tensors; true insists."""
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    supported = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    if str(setting).lower() == "true":
        if not supported:
            devices = sorted({p.device.type for p in tensors})
            raise KdError(
                f"optim.fused=true: torch has no fused optimiser for {', '.join(devices)} tensors; use optim.fused=auto"
            )
        return True
    if str(setting).lower() == "auto" and supported:
        return True
    return None  # torch's default (the foreach kernels)
