"""Semantic segmentation: a label is a mask of class indices (IGNORE_INDEX: a pixel not scored); mIoU
is the headline, from one confusion matrix over the whole split.

mIoU follows the common protocol (mmsegmentation, torchmetrics' JaccardIndex): IoU_c = TP / (TP + FP + FN)
per class, averaged over the classes present in the labels or the predictions of the split (a class
absent from both has no IoU and is left out); ignored pixels count nowhere. Logits of another size than
the mask are resized to the mask (bilinear), so the score is at the label's full resolution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd_cli.tasks.base import Score, Task, register_task

# The label of a pixel that is not scored and not trained on (VOC's borders, padding of a crop).
IGNORE_INDEX = 255


def to_label_size(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) logits resized to the masks' (H, W) where they differ (bilinear, as the papers do)."""
    if logits.shape[-2:] == masks.shape[-2:]:
        return logits
    return F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)


def confusion(predicted: torch.Tensor, masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows the true class, over the pixels that are not ignored."""
    valid = masks != IGNORE_INDEX
    flat = masks[valid].long() * num_classes + predicted[valid].long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(matrix: torch.Tensor) -> torch.Tensor:
    """IoU of each class in %, NaN for a class absent from both labels and predictions."""
    matrix = matrix.double()
    tp = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - tp
    return torch.where(union > 0, 100.0 * tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


class SegmentationScore(Score):
    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix: torch.Tensor | None = None  # summed on the device, read once at the end
        self.loss_sum = 0.0
        self.pixels = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = to_label_size(logits, targets)
        matrix = confusion(logits.argmax(1), targets, self.num_classes)
        self.matrix = matrix if self.matrix is None else self.matrix + matrix
        valid = int((targets != IGNORE_INDEX).sum())
        if valid:
            loss = F.cross_entropy(logits, targets.long(), ignore_index=IGNORE_INDEX, reduction="sum")
            self.loss_sum += float(loss)
            self.pixels += valid

    def result(self) -> dict[str, float]:
        matrix = self._matrix()
        iou = iou_per_class(matrix)
        total = matrix.sum().clamp(min=1)
        support = matrix.sum(1)
        class_acc = (matrix.diag().double() / support.clamp(min=1))[support > 0]
        return {
            "miou": float(iou.nanmean()) if not iou.isnan().all() else 0.0,
            "pixel_acc": 100.0 * float(matrix.diag().sum() / total),
            "mean_class_acc": 100.0 * float(class_acc.mean()) if len(class_acc) else 0.0,
            "loss": self.loss_sum / self.pixels if self.pixels else float("nan"),
        }

    def report(self) -> dict[str, Any]:
        matrix = self._matrix()
        return {
            **self.result(),
            "per_class_iou": iou_per_class(matrix).tolist(),  # NaN: absent from labels and predictions
            "confusion": matrix,
            "num_pixels": int(matrix.sum()),
        }

    def _matrix(self) -> torch.Tensor:
        if self.matrix is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        return self.matrix.cpu()


class Segmentation(Task):
    name = "segmentation"
    metric = "miou"
    metric_label = "mIoU"
    train_metric = "pixel_acc"
    target_form = "a mask"
    logit_method = "pixel_kd"

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        logits = to_label_size(logits, targets)
        summed = F.cross_entropy(
            logits, targets.long(), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum"
        )
        return summed / (targets != IGNORE_INDEX).sum().clamp(min=1)  # a batch of ignored pixels only: 0, not NaN

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = targets != IGNORE_INDEX
        right = ((to_label_size(logits, targets).argmax(1) == targets) & valid).sum()
        return right, valid.sum()

    def new_score(self, num_classes: int) -> Score:
        return SegmentationScore(num_classes)


register_task(Segmentation())
