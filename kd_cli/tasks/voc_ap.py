"""PASCAL VOC's AP50: the figure VOC papers report, beside COCO's AP50 (which interpolates precision at 101
recall points and counts crowd regions otherwise).

Per class: the split's detections of that class, best score first; each is a true positive when its IoU
with a ground-truth box of its class in its image is at least 0.5 and that box is not taken yet (the one of
highest IoU is tried), a detection on a `difficult` box (kd's `crowd` flag: VOC's difficult objects, COCO's
crowds) counts neither way, every other one is a false positive. AP is the area under the precision
envelope (precision made non-increasing from the right) over the recall steps: VOC2010's all-point rule,
which VOC2007's own devkit replaced its 11 points with. The mean is over the classes with at least one box
that is not difficult. Boxes are continuous (x2 - x1 wide, not VOC's devkit's + 1 pixel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import box_iou

from kd_cli.tasks.coco_map import ImageBoxes

IOU = 0.5


def voc_ap50(
    truth: Sequence[ImageBoxes], predictions: Sequence[ImageBoxes], num_classes: int
) -> tuple[float, list[float]]:
    """(mean AP50 in %, per-class AP50 in %, NaN for a class without boxes)."""
    per_class = [class_ap(truth, predictions, label) for label in range(num_classes)]
    scored = [ap for ap in per_class if ap == ap]
    return (sum(scored) / len(scored) if scored else float("nan")), per_class


def class_ap(truth: Sequence[ImageBoxes], predictions: Sequence[ImageBoxes], label: int) -> float:
    boxes, difficult, positives = {}, {}, 0
    for image in truth:
        mine = image.labels == label
        boxes[image.image_id] = image.boxes[mine].double()
        difficult[image.image_id] = (
            image.crowd[mine] if image.crowd is not None else torch.zeros(int(mine.sum()))
        ).bool()
        positives += int((~difficult[image.image_id]).sum())
    if positives == 0:
        return float("nan")
    found = [
        (float(score), image.image_id, box.double())
        for image in predictions
        for box, score, mine in zip(image.boxes, image.scores if image.scores is not None else [], image.labels)
        if int(mine) == label
    ]
    found.sort(key=lambda item: -item[0])
    taken = {image_id: torch.zeros(len(b), dtype=torch.bool) for image_id, b in boxes.items()}
    hits: list[int] = []  # 1 true positive, 0 false positive (difficult matches are left out)
    for _, image_id, box in found:
        gt = boxes.get(image_id, torch.zeros(0, 4, dtype=torch.float64))
        if len(gt) == 0:
            hits.append(0)
            continue
        overlaps = box_iou(box[None], gt)[0]
        best = int(overlaps.argmax())
        if overlaps[best] < IOU:
            hits.append(0)
        elif difficult[image_id][best]:
            continue
        elif not taken[image_id][best]:
            taken[image_id][best] = True
            hits.append(1)
        else:
            hits.append(0)
    return 100.0 * area_under_envelope(hits, positives)


def area_under_envelope(hits: list[int], positives: int) -> float:
    """All-point interpolated AP of a ranked list of hits (1) and misses (0) against `positives` boxes."""
    if not hits:
        return 0.0
    flags = torch.tensor(hits, dtype=torch.float64)
    true_positives = flags.cumsum(0)
    recall = torch.cat([torch.zeros(1), true_positives / positives, torch.ones(1)])
    precision = torch.cat([torch.zeros(1), true_positives / torch.arange(1, len(hits) + 1), torch.zeros(1)])
    precision = precision.flip(0).cummax(0).values.flip(0)  # the envelope: non-increasing from the right
    steps = (recall[1:] != recall[:-1]).nonzero().flatten()
    return float(((recall[steps + 1] - recall[steps]) * precision[steps + 1]).sum())
