"""Object detection: a label is an image's boxes (x1 y1 x2 y2 pixels of the image the model sees) and
their classes 0..C-1; COCO AP@[.5:.95] through pycocotools' COCOeval is the headline (`map`, in %).

A detector's training pass returns its own losses (a torchvision detector's loss dict): they are the
task's loss terms, each logged under its own name (`det_classification`, `det_bbox_regression`, ...).
In evaluation it returns per-image detections; the split's score gathers them with the ground truth
and runs COCOeval once at the end, so kd's mAP is pycocotools' mAP on the same boxes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kd_cli.tasks.base import Score, Task, register_task
from kd_cli.tasks.coco_map import STAT_NAMES, ImageBoxes, coco_map
from kd_cli.tasks.voc_ap import voc_ap50

# COCOeval's scalars kept in every epoch's row (the rest, and per-class AP, in `kd evaluate`'s report).
ROW_STATS = ("map", "map50", "map75", "mar100")


def term_name(loss_name: str) -> str:
    """A detector's loss (`loss_classifier`, `bbox_regression`) as a kd term: `det_classifier`, ..."""
    return "det_" + loss_name.removeprefix("loss_")


def detector_terms(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {term_name(name): value for name, value in losses.items()}


class DetectionScore(Score):
    """Detections and ground truth of a split, scored by COCOeval when `result` is read."""

    def __init__(self, num_classes: int, class_names: list[str] | None = None):
        self.num_classes = num_classes
        self.class_names = class_names or [str(k) for k in range(num_classes)]
        self.truth: list[ImageBoxes] = []
        self.predictions: list[ImageBoxes] = []
        self._scored: Any = None

    def update(self, outputs: Any, targets: Any) -> None:  # (per-image dicts, not one logit tensor)
        self.add(outputs, targets)

    def add(self, outputs: Any, targets: Any) -> None:
        for output, target in zip(outputs, targets, strict=True):
            # (boxes back in the data's own pixels: the loader scaled each image by `scale`)
            scale = float(target.get("scale", 1.0))
            boxes, scores = output["boxes"].float().cpu() / scale, output["scores"].float().cpu()
            self.all_finite = self.all_finite and bool(torch.isfinite(boxes).all() and torch.isfinite(scores).all())
            image_id = int(target["image_id"])
            height, width = (int(v) for v in target["size"])
            crowd = target.get("crowd")
            self.truth.append(
                ImageBoxes(
                    image_id,
                    target["boxes"].float().cpu() / scale,
                    target["labels"].cpu(),
                    crowd=None if crowd is None else crowd.cpu(),
                    width=width,
                    height=height,
                )
            )
            if self.all_finite:
                self.predictions.append(ImageBoxes(image_id, boxes, output["labels"].cpu(), scores))
        self._scored = None

    def _coco(self):
        if self._scored is None:
            ids = list(range(self.num_classes))
            self._scored = coco_map(self.truth, self.predictions if self.all_finite else [], ids, self.class_names)
        return self._scored

    def result(self) -> dict[str, float]:
        # No `loss`: a detector in evaluation returns boxes; `all_finite` says whether they were all finite.
        if not self.truth:
            return {name: 0.0 for name in ROW_STATS}
        stats = self._coco().stats
        return {name: _percent(stats[name]) for name in ROW_STATS}

    def report(self) -> dict[str, Any]:
        scored = self._coco()
        voc, voc_per_class = voc_ap50(self.truth, self.predictions if self.all_finite else [], self.num_classes)
        return {
            **self.result(),
            **{name: _percent(scored.stats[name]) for name in STAT_NAMES},
            "voc_ap50": voc,  # PASCAL VOC's AP50 (tasks/voc_ap.py), the figure VOC papers report
            "per_class_ap": [_percent(ap) for ap in scored.per_class_ap],
            "per_class_voc_ap50": voc_per_class,
            "num_images": len(self.truth),
            "num_boxes": sum(len(t.labels) for t in self.truth),
        }


def _percent(value: float) -> float:
    """COCOeval's fraction in %; its -1 (nothing to score, e.g. no large objects) and NaN stay NaN."""
    return 100.0 * value if value >= 0 else math.nan


class Detection(Task):
    name = "detection"
    metric = "map"
    metric_label = "mAP"
    train_metric = ""  # a detector's training pass gives losses, not predictions: nothing to count
    target_form = "boxes"
    logit_method = "pkd"
    teacher_floor = 1.0  # mAP in %: random boxes score ~0; a teacher below it was not trained, loaded or matched

    def loss(self, logits: Any, targets: Any, label_smoothing: float = 0.0) -> torch.Tensor:
        """The sum of a detector's losses (`logits` is the loss dict its training pass returns)."""
        return torch.stack(list(logits.values())).sum()

    def supervised(
        self, model: nn.Module, images: torch.Tensor, targets: Any, label_smoothing: float = 0.0
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        return None, detector_terms(model(images, targets))

    def hits(self, logits: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        zero = torch.zeros(())
        return zero, zero

    def new_score(self, num_classes: int) -> Score:
        return DetectionScore(num_classes)


register_task(Detection())
