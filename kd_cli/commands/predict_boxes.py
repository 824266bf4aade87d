"""`kd predict` with a detector: the boxes it finds on each image, in the image's own pixels.

Each image is fed as the detector was trained: letterboxed to the model's input size (scaled so its longer
side fits, padded black at the right and bottom: the box data sets' own framing, kd_cli/data/box_sets.py),
grey where the model is, normalised by its mean and std. The boxes come back divided by the scale and
clipped to the image. Kept: detections scoring at least `score_threshold`.

Written: OUT (a CSV, one row per box: file, image_id, class, score, x1 y1 x2 y2; an image without a box
has one row with the box cells empty), OUT's `.json` twin in the COCO results format (`image_id`,
`category_id`, `bbox` as x y w h, `score`: what COCOeval's `loadRes` reads), and with `overlay=true` each
image with its boxes drawn (torchvision.utils.draw_bounding_boxes) in OUT's folder + `_boxes/`.

Ids in the results file: the file's own category ids where the model was trained on a COCO file with
gaps (model.json's `category_ids`), else the class index; an image's id is its file name when every name
is a number (COCO's `000000397133.jpg` is image 397133), else its place in the run (1, 2, ...).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kd_cli.commands.inference import Predictor
from kd_cli.commands.predict_masks import unique_name, voc_palette
from kd_cli.errors import KdError

BOX_WIDTH = 2  # pixels of a drawn box's outline


def letterboxed(spec) -> Callable[[torch.Tensor], tuple[torch.Tensor, float]]:
    """uint8 RGB (3, H, W) -> (the normalised (C, S, S) input, the scale from image to input pixels)."""
    from kd_cli.data.box_sets import letterbox
    from kd_cli.data.images import grey

    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)

    def transform(image: torch.Tensor) -> tuple[torch.Tensor, float]:
        image = grey(image) if spec.in_channels == 1 else image
        framed, scale = letterbox(image, spec.input_size)
        return (framed.float() / 255 - mean) / std, scale

    return transform


def image_ids(files: list[Path]) -> list[int]:
    """Each file's image id: its name when every name is a distinct number (COCO's own files), else 1..N."""
    stems = [path.stem for path in files]
    if all(stem.isdigit() for stem in stems) and len({int(stem) for stem in stems}) == len(stems):
        return [int(stem) for stem in stems]
    return list(range(1, len(files) + 1))


def predict_boxes(
    model: Predictor, files: list[Path], args: argparse.Namespace, drawn: Path | None
) -> tuple[list[dict], list[tuple[Path, str]]]:
    """A row per readable image (file, image_id, its detections at or above the threshold, in its own pixels)
    and (file, problem) for the others; with `drawn`, each image with its boxes, there, as PNG."""
    from kd_cli.data.images import UnreadableImage, decode_rgb

    transform = letterboxed(model.spec)
    ids = dict(zip(files, image_ids(files)))
    rows: list[dict] = []
    skipped: list[tuple[Path, str]] = []
    if drawn is not None:
        drawn.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    written: list[Path] = []

    def load(path: Path) -> tuple[torch.Tensor, torch.Tensor, float] | str:
        try:
            image = decode_rgb(str(path))
        except UnreadableImage as error:
            return error.problem or str(error)
        return (image, *transform(image))

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for start in range(0, len(files), args.batch_size):
            batch = files[start : start + args.batch_size]
            loaded = list(pool.map(load, batch))
            bad = [(path, item) for path, item in zip(batch, loaded) if isinstance(item, str)]
            if bad and args.strict:  # nothing kept: the drawings made so far go too
                for picture in written:
                    picture.unlink(missing_ok=True)
                return rows, bad[:1]
            skipped += bad
            kept = [(path, item) for path, item in zip(batch, loaded) if not isinstance(item, str)]
            if not kept:
                continue
            outputs = model.forward(torch.stack([item[1] for _, item in kept]))
            for (path, (image, _, scale)), found in zip(kept, outputs):
                detections = in_image(found, scale, image.shape[-2:], args.score_threshold, model)
                rows.append({"file": str(path), "image_id": ids[path], "detections": detections})
                if drawn is not None:
                    written.append(drawn / f"{unique_name(path.stem, used)}.png")
                    draw(image, detections, written[-1], model.spec.class_names)
    return rows, skipped


def in_image(found: dict, scale: float, size: torch.Size, threshold: float, model: Predictor) -> list[dict]:
    """The detections at or above `threshold`, best first, boxes in the image's pixels (clipped to it)."""
    check_detections(found, model)
    keep = found["scores"] >= threshold
    boxes = (found["boxes"][keep].double() / scale).clamp(min=0)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(max=size[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(max=size[0])
    scores, labels = found["scores"][keep].tolist(), found["labels"][keep].long().tolist()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [{"label": labels[i], "score": scores[i], "box": boxes[i].tolist()} for i in order]


def check_detections(found: dict, model: Predictor) -> None:
    boxes, scores, labels = found["boxes"], found["scores"], found["labels"]
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or not len(boxes) == len(scores) == len(labels):
        raise KdError(
            f"{model.source} gives detections of shapes {list(boxes.shape)}, {list(scores.shape)}, "
            f"{list(labels.shape)}: not one detector's boxes, scores and labels"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= model.spec.num_classes):
        raise KdError(
            f"{model.source} gives class {int(labels.max())}, but its model description lists "
            f"{model.spec.num_classes} classes: they are not of one model"
        )
    if not (torch.isfinite(boxes).all() and torch.isfinite(scores).all()):
        raise KdError(
            f"{model.source} gives non-finite boxes or scores (NaN or inf); its weights are broken: retrain it"
        )


def draw(image: torch.Tensor, detections: list[dict], path: Path, names: list[str]) -> None:
    from torchvision.io import write_png
    from torchvision.utils import draw_bounding_boxes

    if not detections:  # the image as it is (torchvision warns when asked to draw no box)
        write_png(image, str(path))
        return
    palette = voc_palette()
    colours = [tuple(palette[3 * (d["label"] + 1) : 3 * (d["label"] + 2)]) for d in detections]  # class 0: not black
    boxes = torch.tensor([d["box"] for d in detections], dtype=torch.float32).reshape(-1, 4)
    labels = [f"{names[d['label']]} {d['score']:.2f}" for d in detections]
    picture = draw_bounding_boxes(image, boxes, labels=labels, colors=colours, width=BOX_WIDTH)
    write_png(picture, str(path))


def csv_rows(rows: list[dict], names: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["file", "image_id", "class", "score", "x1", "y1", "x2", "y2"]
    cells = []
    for row in rows:
        if not row["detections"]:
            cells.append([row["file"], str(row["image_id"]), "", "", "", "", "", ""])
        for found in row["detections"]:
            box = [f"{value:.2f}" for value in found["box"]]
            cells.append([row["file"], str(row["image_id"]), names[found["label"]], f"{found['score']:.4f}", *box])
    return header, cells


def write_results(path: Path, rows: list[dict], category_ids: list[int]) -> None:
    """The COCO results format: one entry per box, bbox as [x, y, width, height]."""
    from kd_cli.engine.files import atomic_write

    entries = [
        {
            "image_id": row["image_id"],
            "category_id": category_ids[found["label"]],
            "bbox": [
                round(found["box"][0], 2),
                round(found["box"][1], 2),
                round(found["box"][2] - found["box"][0], 2),
                round(found["box"][3] - found["box"][1], 2),
            ],
            "score": round(found["score"], 5),
        }
        for row in rows
        for found in row["detections"]
    ]
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(entries)))
