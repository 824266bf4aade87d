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
from kd_cli.data.on_disk import brief, open_or_explain, shown_path
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


def check_box(box: list[float], width: int, height: int, where: str, written: str = "") -> None:
    """A box (x1, y1, x2, y2) of positive area inside its image (within EDGE pixels), or one line saying
    what is wrong. `written` is the box as its file gives it (COCO's `bbox [x, y, width, height]`): the
    message quotes that, the text the user can find in the file, rather than corners computed here."""
    x1, y1, x2, y2 = box
    shown = written or f"box {_show(box)}"
    if not all(map(_finite, box)):
        raise BadBox(f"{where}: {shown} is not a number")
    if x2 <= x1 or y2 <= y1:
        raise BadBox(f"{where}: {shown} has no area (its width or height is 0 or less)")
    if x1 < -EDGE or y1 < -EDGE or x2 > width + EDGE or y2 > height + EDGE:
        raise BadBox(f"{where}: {shown} lies outside the {width}x{height} image")


def repeated(names: list[str]) -> list[str]:
    """The names listed more than once, each once, in the order they first appear."""
    return [name for name in dict.fromkeys(names) if names.count(name) > 1]


def first_few(items: list[str], first: int = 3) -> str:
    """The first few of `items` for a one-line message, and how many there are when some are left out."""
    return ", ".join(items[:first]) + (f" ... ({len(items)} in all)" if len(items) > first else "")


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
    categories = _check_coco_document(coco.dataset, annotations.name)
    label_of = {c["id"]: k for k, c in enumerate(categories)}

    def reader(image_id: int):
        return lambda: _coco_record(coco, image_id, label_of, images, annotations.name)

    records, skipped = keep_good([reader(i) for i in sorted(coco.imgs)], skip_bad)
    return BoxSet(records, [c["name"] for c in categories], [c["id"] for c in categories], skipped)


def _check_coco_document(document: dict, file: str) -> list[dict]:
    """What pycocotools' index would silently merge or drop: duplicate category or image ids, categories
    without an integer id or a name, annotations of images the file does not list. The categories, by id."""
    categories = document.get("categories") or []
    if not categories:
        raise KdError(f"{file} lists no categories; a COCO annotation file names them under 'categories'")
    for category in categories:
        if not isinstance(category.get("id"), int) or isinstance(category.get("id"), bool):
            raise KdError(f"{file}: category {category.get('id')!r} needs an integer 'id'")
        if not isinstance(category.get("name"), str):
            raise KdError(f"{file}: category id {category['id']} has no 'name'")
    for kind, items in (("category", categories), ("image", document.get("images") or [])):
        ids = [item.get("id") for item in items]
        twice = sorted({i for i in ids if ids.count(i) > 1}, key=str)
        if twice:
            raise KdError(f"{file}: {kind} id {twice[0]} is listed {ids.count(twice[0])} times; ids must be unique")
    # Two categories of one name cannot be told apart in per-class scores or a model's class list; it is
    # most often a copy-paste slip (cat, cat for cat, dog), so it is refused rather than trained on.
    twice = repeated([c["name"] for c in categories])
    if twice:
        shared = [f"{n!r} (ids {', '.join(str(c['id']) for c in categories if c['name'] == n)})" for n in twice]
        raise KdError(f"{file}: categories share a name: {first_few(shared)}; give each category its own name")
    listed = {image.get("id") for image in document.get("images") or []}
    strays = [a.get("id") for a in document.get("annotations") or [] if a.get("image_id") not in listed]
    if strays:
        raise KdError(f"{file}: annotation {strays[0]} names an image_id not in 'images' ({len(strays)} such)")
    return sorted(categories, key=lambda c: c["id"])


def _coco_record(coco, image_id: int, label_of: dict[int, int], images: Path, file: str) -> BoxRecord:
    from PIL import Image, UnidentifiedImageError

    info = coco.imgs[image_id]
    where = f"{file} (image id {image_id})"
    path = images / str(info.get("file_name", ""))
    if not path.is_file():
        raise BadBox(f"{where}: image {shown_path(path)} not found")
    width, height = info.get("width"), info.get("height")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise BadBox(f"{where}: 'width' and 'height' must be whole numbers of pixels (they are {width!r}, {height!r})")
    try:
        with Image.open(path) as opened:  # the header only: the size the boxes are checked against
            actual = opened.size
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise BadBox(f"{where}: {shown_path(path)} cannot be read as an image ({brief(error)})") from None
    if actual != (width, height):
        raise BadBox(f"{where}: the file lists {width}x{height} but {shown_path(path)} is {actual[0]}x{actual[1]}")
    boxes, labels, crowd = [], [], []
    for annotation in coco.imgToAnns.get(image_id, []):
        place = f"{where}, annotation {annotation.get('id')}"
        if annotation.get("category_id") not in label_of:
            raise BadBox(f"{place}: category_id {annotation.get('category_id')} is not in 'categories'")
        try:
            x, y, w, h = (float(v) for v in annotation["bbox"])
        except (KeyError, TypeError, ValueError):
            raise BadBox(f"{place}: 'bbox' must be [x, y, width, height]") from None
        check_box([x, y, x + w, y + h], width, height, place, f"bbox {_show([x, y, w, h])}")
        boxes.append([x, y, x + w, y + h])
        labels.append(label_of[annotation["category_id"]])
        is_crowd = annotation.get("iscrowd", 0)
        if is_crowd not in (0, 1):  # (True and False are 1 and 0); "false" would be a crowd to bool()
            raise BadBox(f"{place}: 'iscrowd' must be 0 or 1, not {is_crowd!r}")
        crowd.append(bool(is_crowd))
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
    try:  # (some tools write 500.0)
        width, height = (float(size.findtext(k)) for k in ("width", "height"))
    except (AttributeError, TypeError, ValueError):
        raise BadBox(f"{where}: <size> must give <width> and <height>") from None
    if not (width.is_integer() and height.is_integer() and width > 0 and height > 0):
        raise BadBox(f"{where}: <size> {width:g}x{height:g} is not a size in whole pixels")
    width, height = int(width), int(height)
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
        difficult.append((item.findtext("difficult") or "0").strip().lower() in ("1", "true"))
    return _record(image, boxes, labels, difficult, index, width, height)


# ------------------------------------------------------------------------------------------------ YOLO


def yolo_boxes(root: Path | str, split: str, class_names: list[str], skip_bad: bool = False) -> BoxSet:
    """`root/images/<split>/NAME.jpg` with `root/labels/<split>/NAME.txt` (the layout Ultralytics reads):
    one `class cx cy w h` line per box, all four fractions of the image's width and height. An image
    without a label file has no boxes; a label file without its image, or two images sharing one label
    file (a.jpg and a.png), is refused. `class_names` come from the data set's data.yaml or the user."""
    root = Path(root)
    check_yolo_root(root)
    if not class_names:
        raise KdError("a YOLO folder needs its class names (data.yaml's `names`), in the order of the class indices")
    images, labels = root / "images" / split, root / "labels" / split
    if not images.is_dir():
        raise KdError(f"YOLO images {shown_path(images)} not found (expected images/{split}/ beside labels/{split}/)")
    if not labels.is_dir():
        raise KdError(
            f"YOLO labels {shown_path(labels)} not found (expected labels/{split}/NAME.txt beside images/{split}/)"
        )
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise KdError(f"{shown_path(images)} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    _check_stems(files, labels)

    def reader(index: int, image: Path):
        return lambda: _yolo_record(index, image, labels / (image.stem + ".txt"), len(class_names))

    records, skipped = keep_good([reader(i, f) for i, f in enumerate(files)], skip_bad)
    return BoxSet(records, list(class_names), list(range(len(class_names))), skipped)


def check_yolo_root(root: Path) -> None:
    """The folder itself first: a wrong dataset.root is named as such, not as the first file missing in it."""
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "not found"
        raise KdError(
            f"YOLO folder {shown_path(root)} {state} (expected images/<split>/, labels/<split>/ and data.yaml "
            "in it); give its path as dataset.root"
        )


def _check_stems(files: list[Path], labels: Path) -> None:
    """Each label file belongs to exactly one image: none without its image, none shared by two."""
    stems: dict[str, Path] = {}
    for image in files:
        if image.stem in stems:
            raise KdError(
                f"{shown_path(stems[image.stem])} and {image.name} would share the label file {image.stem}.txt; "
                "rename one of them"
            )
        stems[image.stem] = image
    orphans = sorted(p.name for p in labels.glob("*.txt") if p.stem not in stems)
    if orphans:
        raise KdError(
            f"{shown_path(labels)} has label files without an image in images/: {', '.join(orphans[:3])}"
            f"{' ...' if len(orphans) > 3 else ''} ({len(orphans)}); move their images there or remove them"
        )


def _yolo_record(index: int, image: Path, labels_file: Path, classes: int) -> BoxRecord:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as opened:  # the header only: the size
            width, height = opened.size
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise BadBox(f"{shown_path(image)} cannot be read as an image ({brief(error)})") from None
    rows: list[str] = []
    if labels_file.is_file():
        try:  # utf-8-sig: a byte-order mark some editors write is not part of the first row
            rows = labels_file.read_bytes().decode("utf-8-sig").splitlines()
        except UnicodeDecodeError:
            raise BadBox(f"{shown_path(labels_file)} is not UTF-8 text (rows of `class cx cy w h`)") from None
    boxes, labels = [], []
    for number, row in enumerate(rows, 1):
        if not row.strip():
            continue
        box, label = _yolo_row(row, width, height, classes, f"{shown_path(labels_file)}:{number}")
        boxes.append(box)
        labels.append(label)
    return _record(str(image), boxes, labels, [False] * len(labels), index, width, height)


def _yolo_row(row: str, width: int, height: int, classes: int, where: str) -> tuple[list[float], int]:
    words = row.split()
    if len(words) != 5:  # (a segment's polygon has more: not a box file)
        raise BadBox(f"{where}: '{row.strip()[:60]}' is not `class cx cy w h`")
    try:
        if any("_" in word for word in words):  # Python's float() reads 1_0 as 10; no annotation tool writes it
            raise ValueError
        number, cx, cy, w, h = (float(v) for v in words)
    except ValueError:
        raise BadBox(f"{where}: '{row.strip()[:60]}' is not `class cx cy w h` (numbers)") from None
    # The row is numbers, but 1.5 names no class: said as such, not as a row that is not numbers. 1.0 is
    # class 1, as Ultralytics reads it (some exporters write the index as a float).
    if not number.is_integer():
        raise BadBox(f"{where}: class index {words[0]} must be a whole number 0..{classes - 1} (the first column)")
    label = int(number)
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
