"""Classification: a label is a class index; top-1 accuracy is the headline."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd_cli.tasks.base import Score, Task, register_task


class ClassificationScore(Score):
    """Keeps the split's logits (a classifier's are small) so top-5, calibration and the confusion
    matrix come from the same pass."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.logits.append(logits.float().cpu())
        self.labels.append(targets.cpu())

    def _all(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.logits), torch.cat(self.labels)

    def result(self) -> dict[str, float]:
        logits, labels = self._all()
        return {"top1": topk_accuracy(logits, labels, 1), "loss": F.cross_entropy(logits, labels).item()}

    def report(self) -> dict[str, Any]:
        return classification_report(*self._all(), self.num_classes)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al., 2017): confidence-vs-accuracy gap averaged over equal-width bins, in %."""
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            gap = (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
            ece += gap * in_bin.float().mean()
    return 100.0 * ece.item()


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows: true class, columns: predicted class."""
    predicted = logits.argmax(dim=1)
    flat = labels * num_classes + predicted
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    confusion = confusion_matrix(logits, labels, num_classes)
    support = confusion.sum(dim=1).clamp(min=1)
    return {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "nll": F.cross_entropy(logits, labels).item(),
        "ece": expected_calibration_error(logits, labels),
        "per_class_accuracy": (100.0 * confusion.diag() / support).tolist(),
        "confusion": confusion,
        "num_samples": int(labels.numel()),
    }


class Classification(Task):
    name = "classification"
    metric = "top1"
    metric_label = "top-1"
    train_metric = "top1"
    target_form = "a class index"
    logit_method = "kd"

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        right = (logits.argmax(1) == targets).sum()
        return right, torch.tensor(len(targets), device=right.device)

    def new_score(self, num_classes: int) -> Score:
        return ClassificationScore(num_classes)


register_task(Classification())
