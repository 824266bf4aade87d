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
