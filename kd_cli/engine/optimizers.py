"""The optimisers `optim.name` picks, registered by name (torch is imported when one is built, so that
checking a config stays torch-free). A builder takes the parameter groups and, by keyword, the options
of configs/optim/NAME.yaml it uses; `fused` is decided by the loop (engine/optim.use_fused).

To add one: a function here with `@register_optimizer("name")` and configs/optim/name.yaml holding every
key the other optimisers' files hold (the schedule's among them), its own defaults set."""

from __future__ import annotations

from typing import Any, cast

from kd_cli.registry import Registry

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
