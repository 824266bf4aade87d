"""Boxes as users have them on disk: COCO instance JSON (read by pycocotools), Pascal VOC's XML (listed by
torchvision's VOCDetection) and the YOLO folder layout.

Every reader gives the same records: an image file, its boxes as (x1, y1, x2, y2) pixels, labels
0..C-1 in the order of the class list, COCO's `iscrowd` flags, and the file's own category id of each
label (COCO ids may have gaps; `tasks/coco_map.py` writes results with them). Every box is checked
against its image: outside the image, x2 <= x1 or y2 <= y1 (no area), an unknown category or class
index, a malformed line, a missing image. Each is one line naming the file and the annotation; with
`skip_bad=True` the image is left out and counted instead, never trained on as it is.

(Issue 24: the detection data sets are registered when the detection task is; these are their readers.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kd_cli.data.coco_masks import open_annotations
from kd_cli.data.on_disk import open_or_explain, shown_path
from kd_cli.data.voc import VOC_CLASSES
from kd_cli.errors import KdError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EDGE = 1.0  # pixels a box may overrun its image by (rounding in annotation tools) before it is refused


class BadBox(KdError):
    """One image's annotation that cannot be trained on: skipped and counted with skip_bad=True."""


@dataclass
class BoxRecord:
    image: str
    boxes: torch.Tensor  # (N, 4) float32 x1 y1 x2 y2 pixels
    labels: torch.Tensor  # (N,) int64 0..C-1
    crowd: torch.Tensor  # (N,) bool: COCO's iscrowd (matched in evaluation, never a miss; not trained on)
    image_id: int
    width: int
    height: int


@dataclass
class BoxSet:
    records: list[BoxRecord]
    class_names: list[str]
    category_ids: list[int]  # the file's id of each label (0..C-1 for a YOLO folder)
    skipped: list[str] = field(default_factory=list)  # why each left-out image was left out


def check_box(box: list[float], width: int, height: int, where: str) -> None:
    """A box of positive area inside its image (within EDGE pixels), or one line saying what is wrong."""
    x1, y1, x2, y2 = box
    if not all(map(_finite, box)):
        raise BadBox(f"{where}: box {_show(box)} is not a number")
    if x2 <= x1 or y2 <= y1:
        raise BadBox(f"{where}: box {_show(box)} has no area (x2 <= x1 or y2 <= y1)")
    if x1 < -EDGE or y1 < -EDGE or x2 > width + EDGE or y2 > height + EDGE:
        raise BadBox(f"{where}: box {_show(box)} lies outside the {width}x{height} image")


def keep_good(reads, skip_bad: bool) -> tuple[list[BoxRecord], list[str]]:
    """Run each image's read; a BadBox stops everything, or with skip_bad leaves the image out, counted."""
    records, skipped = [], []
    for read in reads:
        try:
            records.append(read())
        except BadBox as error:
            if not skip_bad:
                raise KdError(f"{error} (or skip such images with dataset.skip_bad_boxes=true)") from None
            skipped.append(str(error))
    return records, skipped


# ------------------------------------------------------------------------------------------------ COCO


def coco_boxes(annotations: Path, images: Path, skip_bad: bool = False) -> BoxSet:
    """The images of one COCO instance file (images without boxes kept), by image id; category ids in
    id order become labels 0..C-1."""
    coco = open_annotations(annotations, "detection")
    categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    if not categories:
        raise KdError(f"{annotations.name} lists no categories; a COCO annotation file names them under 'categories'")
    label_of = {c["id"]: k for k, c in enumerate(categories)}

    def reader(image_id: int):
        return lambda: _coco_record(coco, image_id, label_of, images, annotations.name)

    records, skipped = keep_good([reader(i) for i in sorted(coco.imgs)], skip_bad)
    return BoxSet(records, [c["name"] for c in categories], [c["id"] for c in categories], skipped)


def _coco_record(coco, image_id: int, label_of: dict[int, int], images: Path, file: str) -> BoxRecord:
    info = coco.imgs[image_id]
    where = f"{file} (image id {image_id})"
    path = images / str(info.get("file_name", ""))
    if not path.is_file():
        raise BadBox(f"{where}: image {shown_path(path)} not found")
    width, height = int(info.get("width", 0)), int(info.get("height", 0))
    boxes, labels, crowd = [], [], []
    for annotation in coco.imgToAnns.get(image_id, []):
        place = f"{where}, annotation {annotation.get('id')}"
        if annotation.get("category_id") not in label_of:
            raise BadBox(f"{place}: category_id {annotation.get('category_id')} is not in 'categories'")
        try:
            x, y, w, h = (float(v) for v in annotation["bbox"])
        except (KeyError, TypeError, ValueError):
            raise BadBox(f"{place}: 'bbox' must be [x, y, width, height]") from None
        check_box([x, y, x + w, y + h], width, height, place)
        boxes.append([x, y, x + w, y + h])
        labels.append(label_of[annotation["category_id"]])
        crowd.append(bool(annotation.get("iscrowd", 0)))
    return _record(str(path), boxes, labels, crowd, image_id, width, height)


# ------------------------------------------------------------------------------------------------ VOC


def voc_boxes(root: str, year: str, image_set: str, download: bool = False, skip_bad: bool = False) -> BoxSet:
    """Pascal VOC's detection split from `root/VOCdevkit/VOC<year>/`, listed (and downloaded) by torchvision's
    VOCDetection; each Annotations/NAME.xml read here. VOC's corners are 1-based and inclusive: x1 = xmin - 1,
    x2 = xmax (so a box's width is VOC's xmax - xmin + 1). `difficult` objects are marked like COCO's
    crowds: not trained on, neither a hit nor a miss in evaluation, as VOC's own evaluation ignores them."""
    import torchvision.datasets as tv

    folder = os.path.join(root, "VOCdevkit", f"VOC{year}")
    listing = os.path.join(folder, "ImageSets", "Main", f"{image_set}.txt")
    dataset = open_or_explain(
        f"VOC{year} detection",
        folder,
        f"JPEGImages/, Annotations/ and ImageSets/Main/{image_set}.txt",
        [listing],
        download,
        lambda: tv.VOCDetection(root, year, image_set, download=download),
    )
    names = VOC_CLASSES[1:]  # detection has no background class
    label_of = {name: k for k, name in enumerate(names)}

    def reader(index: int, image: str, annotation: str):
        return lambda: _voc_record(index, image, Path(annotation), label_of)

    reads = [reader(i, image, xml) for i, (image, xml) in enumerate(zip(dataset.images, dataset.annotations))]
    records, skipped = keep_good(reads, skip_bad)
    return BoxSet(records, names, list(range(len(names))), skipped)


def _voc_record(index: int, image: str, annotation: Path, label_of: dict[str, int]) -> BoxRecord:
    from xml.etree.ElementTree import ParseError

    from torchvision.datasets.voc import ET_parse as parse  # defusedxml's parser where it is installed

    where = shown_path(annotation)
    if not Path(image).is_file():
        raise BadBox(f"{where}: image {shown_path(Path(image))} not found")
    try:
        tree = parse(annotation).getroot()
    except (OSError, ParseError, ValueError) as error:  # (defusedxml refuses entity tricks with ValueErrors)
        raise BadBox(f"{where} cannot be read as XML ({error})") from None
    size = tree.find("size")
    try:
        width, height = int(size.findtext("width")), int(size.findtext("height"))
    except (AttributeError, TypeError, ValueError):
        raise BadBox(f"{where}: <size> must give <width> and <height>") from None
    boxes, labels, difficult = [], [], []
    for number, item in enumerate(tree.iter("object"), 1):
        place = f"{where}, object {number}"
        name = (item.findtext("name") or "").strip()
        if name not in label_of:
            raise BadBox(f"{place}: '{name}' is not one of VOC's 20 classes")
        try:
            xmin, ymin, xmax, ymax = (float(item.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise BadBox(f"{place}: <bndbox> must give xmin, ymin, xmax, ymax") from None
        box = [xmin - 1, ymin - 1, xmax, ymax]
        check_box(box, width, height, place)
        boxes.append(box)
        labels.append(label_of[name])
        difficult.append((item.findtext("difficult") or "0").strip() == "1")
    return _record(image, boxes, labels, difficult, index, width, height)


# ------------------------------------------------------------------------------------------------ YOLO


def yolo_boxes(root: Path, split: str, class_names: list[str], skip_bad: bool = False) -> BoxSet:
    """`root/images/<split>/NAME.jpg` with `root/labels/<split>/NAME.txt` (the layout Ultralytics reads):
    one `class cx cy w h` line per box, all four fractions of the image's width and height. An image
    without a label file has no boxes; `class_names` come from the data set's data.yaml or the user."""
    from PIL import Image

    images = root / "images" / split
    if not images.is_dir():
        raise KdError(f"YOLO images {shown_path(images)} not found (expected images/{split}/ beside labels/{split}/)")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise KdError(f"{shown_path(images)} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    def reader(index: int, image: Path):
        def read() -> BoxRecord:
            with Image.open(image) as opened:  # the header only: the size
                width, height = opened.size
            labels_file = root / "labels" / split / (image.stem + ".txt")
            rows = labels_file.read_text().splitlines() if labels_file.is_file() else []
            boxes, labels = [], []
            for number, row in enumerate(rows, 1):
                if not row.strip():
                    continue
                box, label = _yolo_row(row, width, height, len(class_names), f"{shown_path(labels_file)}:{number}")
                boxes.append(box)
                labels.append(label)
            return _record(str(image), boxes, labels, [False] * len(labels), index, width, height)

        return read

    records, skipped = keep_good([reader(i, f) for i, f in enumerate(files)], skip_bad)
    return BoxSet(records, list(class_names), list(range(len(class_names))), skipped)


def _yolo_row(row: str, width: int, height: int, classes: int, where: str) -> tuple[list[float], int]:
    words = row.split()
    if len(words) != 5:  # (a segment's polygon has more: not a box file)
        raise BadBox(f"{where}: '{row.strip()[:60]}' is not `class cx cy w h`")
    try:
        label, cx, cy, w, h = int(words[0]), *(float(v) for v in words[1:])
    except ValueError:
        raise BadBox(f"{where}: '{row.strip()[:60]}' is not `class cx cy w h` (numbers)") from None
    if not 0 <= label < classes:
        raise BadBox(f"{where}: class {label} is not one of the {classes} class names (0..{classes - 1})")
    box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
    check_box(box, width, height, where)
    return box, label


def _record(image: str, boxes, labels, crowd, image_id: int, width: int, height: int) -> BoxRecord:
    return BoxRecord(
        image,
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(crowd, dtype=torch.bool),
        image_id,
        width,
        height,
    )


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _show(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"
