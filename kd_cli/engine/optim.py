"""Optimisers and learning-rate schedules.

The schedule is a pure function of training progress (fractional epochs), so resuming needs no
scheduler state and the learning rate after a resume is exactly the uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from omegaconf import DictConfig

from kd_cli.errors import KdError
from kd_cli.registry import Range, check_number

SCHEDULES = ("cosine", "multistep", "constant")


def param_groups(params: Iterable[torch.nn.Parameter], backbone: Iterable[torch.nn.Parameter],
                 backbone_lr_scale: float) -> list[dict]:
    """One group, or (fine-tuning) the `backbone` parameters at `backbone_lr_scale` times the rate and
    the rest (the new classifier, adapters) at the full rate. `lr_scale` is read by `set_lr`."""
    params = list(params)
    if backbone_lr_scale == 1.0:
        return [{"params": params, "lr_scale": 1.0}]
    slow = {id(p) for p in backbone}
    groups = [{"params": [p for p in params if id(p) in slow], "lr_scale": float(backbone_lr_scale)},
              {"params": [p for p in params if id(p) not in slow], "lr_scale": 1.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(params: Iterable[torch.nn.Parameter] | list[dict], cfg: DictConfig) -> torch.optim.Optimizer:
    params = list(params)
    # Every parameter is decayed, biases and BN scales included, as in the KD literature's recipes.
    if cfg.name == "sgd":
        nesterov = cfg.nesterov and cfg.momentum > 0
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise KdError(f"unknown optim.name '{cfg.name}' (choose from: sgd, adamw)")


def check_optim(cfg: DictConfig, epochs: int) -> None:
    """Every optimiser and schedule value, before anything is built (NaN and inf included)."""
    if cfg.name not in ("sgd", "adamw"):
        raise KdError(f"unknown optim.name '{cfg.name}' (choose from: sgd, adamw)")
    if cfg.schedule not in SCHEDULES:
        raise KdError(f"unknown optim.schedule '{cfg.schedule}' (choose from: {', '.join(SCHEDULES)})")
    check_number("optim.lr", cfg.lr, Range(0, low_open=True))
    check_number("optim.weight_decay", cfg.weight_decay, Range(0))
    check_number("optim.momentum", cfg.momentum, Range(0, 1, high_open=True))
    if len(cfg.betas) != 2:
        raise KdError(f"optim.betas={list(cfg.betas)} must be two numbers (Adam's decay rates), e.g. [0.9,0.999]")
    for beta in cfg.betas:
        check_number("optim.betas", beta, Range(0, 1, high_open=True), hint="each of the two")
    check_number("optim.gamma", cfg.gamma, Range(0, low_open=True))
    check_number("optim.backbone_lr_scale", cfg.backbone_lr_scale, Range(0, 1, low_open=True),
                 hint="the fraction of optim.lr the pretrained layers get")
    check_number("optim.min_lr", cfg.min_lr, Range(0, cfg.lr), hint="at most optim.lr")
    for milestone in cfg.milestones:
        check_number("optim.milestones", milestone, Range(0), hint="epochs at which the rate drops")
    check_number("optim.warmup_epochs", cfg.warmup_epochs, Range(0, epochs), hint=f"trainer.epochs={epochs}")


def lr_at(cfg: DictConfig, progress: float, epochs: int) -> float:
    """Learning rate after `progress` epochs (fractional) of `epochs`."""
    if cfg.warmup_epochs > 0 and progress < cfg.warmup_epochs:
        return cfg.lr * progress / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        start = cfg.warmup_epochs
        t = (progress - start) / max(epochs - start, 1e-8)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))
    if cfg.schedule == "multistep":
        passed = sum(1 for m in cfg.milestones if progress >= m)
        return cfg.lr * cfg.gamma**passed
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
