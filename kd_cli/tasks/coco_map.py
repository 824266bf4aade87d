"""COCO box AP through pycocotools' own COCOeval: kd's detection numbers are pycocotools' numbers.

kd trains on contiguous labels 0..C-1; a COCO file's category ids may have gaps (COCO's 80 classes run
1..90). `category_ids[k]` is the file's id of label k: ground truth and results are written with the
file's ids, so a results file kd writes is read by any COCO tool against the data's own annotations.
Boxes go in as (x1, y1, x2, y2) pixels and out as COCO's (x, y, width, height).

(The detection task itself, its models and its data sets, are the next steps of issue 24: this module
is the scoring they will share, tested against COCOeval on files written to disk.)
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kd_cli.errors import KdError

# COCOeval.stats, in its order: AP over IoU 0.50:0.95, at 0.50, at 0.75, for small/medium/large objects,
# then AR with at most 1, 10, 100 detections per image and AR for small/medium/large.
STAT_NAMES = (
    "map",
    "map50",
    "map75",
    "map_small",
    "map_medium",
    "map_large",
    "mar1",
    "mar10",
    "mar100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


@dataclass
class ImageBoxes:
    """One image's boxes: (N, 4) x1 y1 x2 y2 pixels, labels (N,) in 0..C-1; for ground truth `crowd`
    marks COCO's iscrowd regions (matched, never counted as misses); for predictions `scores` (N,)."""

    image_id: int
    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor | None = None
    crowd: torch.Tensor | None = None
    width: int = 0
    height: int = 0


@dataclass
class CocoScores:
    stats: dict[str, float]
    per_class_ap: list[float] = field(default_factory=list)  # AP@[.5:.95] per label; NaN where it has no boxes


def xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.detach().double().cpu()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()


def ground_truth(images: Sequence[ImageBoxes], category_ids: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """The COCO annotation dict (as instances_*.json holds it) of `images`' boxes."""
    annotations: list[dict[str, Any]] = []
    for image in images:
        crowd = image.crowd if image.crowd is not None else torch.zeros(len(image.labels), dtype=torch.bool)
        for box, label, is_crowd in zip(xywh(image.boxes), image.labels.tolist(), crowd.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image.image_id,
                    "category_id": category_ids[label],
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(is_crowd),
                }
            )
    return {
        "images": [{"id": i.image_id, "width": i.width, "height": i.height} for i in images],
        "annotations": annotations,
        "categories": [{"id": c, "name": n} for c, n in zip(category_ids, names, strict=True)],
    }


def results(predictions: Sequence[ImageBoxes], category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The COCO results list (a results .json file holds it): one entry per predicted box."""
    entries = []
    for image in predictions:
        if image.scores is None:
            raise KdError(f"predictions for image {image.image_id} have no scores")
        for box, label, score in zip(xywh(image.boxes), image.labels.tolist(), image.scores.tolist(), strict=True):
            entries.append(
                {"image_id": image.image_id, "category_id": category_ids[label], "bbox": box, "score": score}
            )
    return entries


def coco_evaluate(truth: dict[str, Any], detections: list[dict[str, Any]]) -> CocoScores:
    """pycocotools' COCOeval (bbox) of a results list against an annotation dict. Scores are fractions
    (1.0 = perfect), as COCOeval gives them; -1 (nothing to score, e.g. no large objects) stays -1."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        if detections:
            dt = gt.loadRes(detections)
        else:  # loadRes refuses an empty list: an index of no detections scores as COCOeval scores misses
            dt = COCO()
            dt.dataset = {"images": truth["images"], "categories": truth["categories"], "annotations": []}
            dt.createIndex()
        evaluation = COCOeval(gt, dt, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = {name: float(value) for name, value in zip(STAT_NAMES, evaluation.stats, strict=True)}
    return CocoScores(stats, _per_class_ap(evaluation.eval["precision"]))


def _per_class_ap(precision: np.ndarray) -> list[float]:
    """AP@[.5:.95] per category from COCOeval's precision array (IoU x recall x class x area x max-dets):
    all areas, 100 detections; -1 entries (no ground truth) left out, NaN for a class with none."""
    per_class = []
    for k in range(precision.shape[2]):
        values = precision[:, :, k, 0, -1]
        valid = values[values > -1]
        per_class.append(float(valid.mean()) if valid.size else float("nan"))
    return per_class


def coco_map(
    truth: Sequence[ImageBoxes],
    predictions: Sequence[ImageBoxes],
    category_ids: Sequence[int],
    names: Sequence[str],
) -> CocoScores:
    """COCO AP of `predictions` against `truth` (the same image ids), labels mapped to the file's ids."""
    if len(category_ids) != len(names):
        raise KdError(f"{len(category_ids)} category ids for {len(names)} class names")
    ids = [image.image_id for image in truth]
    if len(set(ids)) != len(ids):
        raise KdError("the ground truth lists an image id twice; image ids must be unique")
    for image in [*truth, *predictions]:
        _check_image_boxes(image, len(names))
    strays = sorted({p.image_id for p in predictions} - set(ids))
    if strays:
        raise KdError(f"predictions for image id {strays[0]}, which the ground truth does not list")
    return coco_evaluate(ground_truth(truth, category_ids, names), results(predictions, category_ids))


def _check_image_boxes(image: ImageBoxes, classes: int) -> None:
    """Boxes (N, 4) and N labels (and scores) that are finite, labels in 0..classes-1: NaN would score as
    a perfect hit in COCOeval, and a label of -1 as the last class."""
    n = len(image.labels)
    where = f"image id {image.image_id}"
    if image.boxes.ndim != 2 or image.boxes.shape[1] != 4 or len(image.boxes) != n:
        raise KdError(f"{where}: boxes of shape {tuple(image.boxes.shape)} for {n} labels (expected ({n}, 4))")
    if image.labels.is_floating_point() or (
        n and not 0 <= int(image.labels.min()) <= int(image.labels.max()) < classes
    ):
        raise KdError(f"{where}: labels must be whole numbers in 0..{classes - 1}")
    if not torch.isfinite(image.boxes).all():
        raise KdError(f"{where}: a box is not finite (NaN or inf)")
    if image.scores is not None and (len(image.scores) != n or not torch.isfinite(image.scores).all()):
        raise KdError(f"{where}: scores must be {n} finite numbers, one per box")
