"""The task contract: its loss, how a training batch counts as right, how a split is scored.

A task is stateless; `new_score` starts one pass over a split, fed batch by batch (`Score.update`), so a
segmentation split's logits never have to sit in memory at once. The headline metric (`metric`) chooses
the best epoch and names the summary's keys (`best_top1`, `last_miou`, ...).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from kd_cli.errors import KdError


class Score(ABC):
    """One pass over a split: `update` per batch (logits float32, targets as the loader gives them);
    `all_finite` says whether every logit was finite (a teacher with broken weights is refused by it)."""

    all_finite = True

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.float()
        self.all_finite = self.all_finite and bool(torch.isfinite(logits).all())
        self.add(logits, targets)

    @abstractmethod
    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None: ...

    @abstractmethod
    def result(self) -> dict[str, float]:
        """The scalars of the pass: the task's headline metric, `loss`, and the task's other numbers."""

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """Everything `kd evaluate` writes: the scalars plus per-class figures and the confusion matrix."""


class Task(ABC):
    name: str = "?"
    metric: str = "?"  # the headline key: `val_<metric>` chooses the best epoch; `best_<metric>` in summary.json
    metric_label: str = "?"  # as printed: "top-1", "mIoU"
    train_metric: str = "?"  # what a training batch's hits measure: `train_<train_metric>` in metrics.csv
    target_form: str = "?"  # what a label is, for messages: "a class index", "a mask"
    logit_method: str = "?"  # the task's logit distillation: `kd compress` recovers with it by default
    # The least headline score of a teacher worth distilling from, where an untrained model's is known and
    # a failed load is common and silent (detection: an untrained detector scores about 0 mAP); None: no floor.
    teacher_floor: float | None = None

    @abstractmethod
    def loss(self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """The task loss (what `method=none` trains, and each method's `ce` term)."""

    def supervised(
        self, model: nn.Module, images: torch.Tensor, targets: Any, label_smoothing: float = 0.0
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """The model's outputs on a training batch and its task loss as named terms (`ce`): what
        `method=none` trains. Detection overrides it: a detector's training pass returns its losses."""
        logits = model(images)
        return logits, {"ce": self.loss(logits, targets, label_smoothing=label_smoothing)}

    @abstractmethod
    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(right, counted) for a training batch, both on the device: no host sync per step."""

    @abstractmethod
    def new_score(self, num_classes: int) -> Score: ...


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    return sorted(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KdError(f"unknown task '{name}'; kd knows {', '.join(task_names())}")
    return TASKS[name]
