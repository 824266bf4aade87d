"""The learning-rate schedule.

The schedule is a pure function of training progress (fractional epochs), so resuming needs no
scheduler state and the learning rate after a resume is exactly the uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import DictConfig

if TYPE_CHECKING:
    import torch

POLY_POWER = 0.9  # the power every segmentation recipe kd follows uses (DeepLab, torchvision, CIRKD)


@dataclass(frozen=True)
class Schedule:
    """The learning rate as a pure function of progress in epochs, read from the config once: a DictConfig
    read costs microseconds, and the loop asks every step (host work that shows on a GPU at batch 64)."""

    lr: float
    kind: str
    epochs: int
    warmup_epochs: float
    min_lr: float
    milestones: tuple[float, ...]
    gamma: float

    @classmethod
    def from_config(cls, cfg: DictConfig, epochs: int) -> Schedule:
        return cls(
            float(cfg.lr),
            str(cfg.schedule),
            epochs,
            float(cfg.warmup_epochs),
            float(cfg.min_lr),
            tuple(float(m) for m in cfg.milestones),
            float(cfg.gamma),
        )

    def at(self, progress: float) -> float:
        """Learning rate after `progress` epochs (fractional) of `epochs`."""
        if self.warmup_epochs > 0 and progress < self.warmup_epochs:
            return self.lr * progress / self.warmup_epochs
        if self.kind == "cosine":
            t = (progress - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1e-8)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))
        if self.kind == "poly":  # DeepLab's (and torchvision's segmentation reference): (1 - t)^0.9
            t = (progress - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1e-8)
            return self.min_lr + (self.lr - self.min_lr) * (1 - min(t, 1.0)) ** POLY_POWER
        if self.kind == "multistep":
            return self.lr * self.gamma ** sum(1 for m in self.milestones if progress >= m)
        return self.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
