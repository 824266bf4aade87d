"""Classification metrics computed from logits: top-k, NLL, calibration, per-class, confusion."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.engine.device import autocast


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (float32, CPU) and labels of a loader, in order, with the model in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for images, targets in batches:
        with autocast(device, dtype):
            out = model(images)
        logits.append(out.float())
        labels.append(targets)
    model.train(was_training)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


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
