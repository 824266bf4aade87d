"""The detection data sets users have on disk, registered: COCO instance files (`coco_detection`), Pascal VOC
(`voc_detection`, torchvision's VOCDetection) and the YOLO folder layout (`yolo_detection`).

Each is read by its reader in data/boxes.py (every box checked; `skip_bad_boxes` leaves a bad image out,
counted in a warning) and held in memory as a BoxSplit: every image decoded by data/images.decode_rgb and
letterboxed to `image_size` (scaled so its longer side fits, padded black at the right and bottom, its
boxes scaled with it). The scale and the original size travel with each image, so scores and results
files are in the data's own pixels and image ids, with the file's own category ids (COCO's have gaps).
COCO's `iscrowd` regions and VOC's `difficult` objects are not trained on; in evaluation COCOeval ignores
what they cover. (Streaming from disk, as segmentation's `stream=true` does, is not built for boxes yet:
COCO's train2017 at 320 px takes about 36 GB of memory.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

from kd_cli.data.base import BoxSplit, DataSplits, absolute, register_dataset, tensor_splits
from kd_cli.data.boxes import BoxSet, check_yolo_root, coco_boxes, first_few, repeated, voc_boxes, yolo_boxes
from kd_cli.data.images import decode_rgb
from kd_cli.errors import KdError, warn
from kd_cli.registry import Range

ImageSide = Annotated[int, Range(16, 4096)]


def letterbox(image: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """uint8 (C, H, W) scaled so its longer side is `size` (bilinear, antialiased when shrinking), padded
    black at the right and bottom to `size` x `size`; and the scale (new pixels per original pixel)."""
    height, width = image.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.interpolate(
        image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=scale < 1, align_corners=False
    )[0]
    canvas = torch.zeros(image.shape[0], size, size, dtype=torch.uint8)
    canvas[:, :new_h, :new_w] = resized.round().clamp(0, 255).to(torch.uint8)
    return canvas, scale


def box_split(boxes: BoxSet, image_size: int, train: bool) -> BoxSplit:
    """The records of `boxes` decoded and letterboxed; crowd/difficult boxes left out of a training split
    and kept, flagged, in a test split (COCOeval ignores what they cover)."""
    images, all_boxes, labels, crowds, scales, sizes = [], [], [], [], [], []
    for record in boxes.records:
        image, scale = letterbox(decode_rgb(record.image), image_size)
        keep = ~record.crowd if train else torch.ones_like(record.crowd)
        images.append(image)
        all_boxes.append((record.boxes[keep] * scale).float())
        labels.append(record.labels[keep])
        crowds.append(record.crowd[keep])
        scales.append(scale)
        sizes.append((record.height, record.width))
    stacked = torch.stack(images) if images else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
    ids = [r.image_id for r in boxes.records]
    return BoxSplit(stacked, all_boxes, labels, ids, scales, sizes, crowds)


def splits_of(title: str, train: BoxSet, test: BoxSet, image_size: int, *identity: str) -> DataSplits:
    if train.class_names != test.class_names or train.category_ids != test.category_ids:
        raise KdError(
            f"dataset={title}: the training and test annotations list different categories "
            f"({differ(train, test)}); give files of one category list"
        )
    for what, box_set in (("training", train), ("test", test)):
        if box_set.skipped:
            warn(
                f"dataset={title}: {len(box_set.skipped)} {what} image(s) left out for bad boxes "
                f"(dataset.skip_bad_boxes=true), the first: {box_set.skipped[0]}"
            )
        if not box_set.records:
            raise KdError(f"dataset={title}: the {what} split has no images left; fix its annotations")
    data = tensor_splits(
        box_split(train, image_size, train=True),
        box_split(test, image_size, train=False),
        train.class_names,
        title,
        str(train.category_ids),
        *identity,
        task="detection",
    )
    data.category_ids = list(train.category_ids)
    return data


def differ(train: BoxSet, test: BoxSet) -> str:
    """The categories (id: name) one split lists and the other does not, the first few of each: what to fix."""
    pairs = [[f"{i}: {n}" for i, n in zip(s.category_ids, s.class_names)] for s in (train, test)]
    only = [[p for p in mine if p not in theirs] for mine, theirs in (pairs, pairs[::-1])]
    parts = [f"only in the {what}: {first_few(o)}" for what, o in zip(("training file", "test file"), only) if o]
    return "; ".join(parts) or "the same categories in another order"


@register_dataset("coco_detection")
def coco_detection(
    root: str = "data/coco",
    download: bool = False,
    train_annotations: str = "annotations/instances_train2017.json",
    train_images: str = "train2017",
    test_annotations: str = "annotations/instances_val2017.json",
    test_images: str = "val2017",
    image_size: ImageSide = 320,
    skip_bad_boxes: bool = False,
) -> DataSplits:
    """A COCO-format data set: instance files and image folders, relative to `root` (or absolute). Images
    without boxes are kept (they teach the background)."""
    top = Path(absolute(root))
    if download:
        raise KdError(
            "dataset=coco_detection does not download COCO (19 GB): get train2017.zip, val2017.zip and "
            f"annotations_trainval2017.zip from https://cocodataset.org, unpack them in {top}, and run without "
            "dataset.download (or point the *_annotations/*_images options at your own COCO-format files)"
        )
    train = coco_boxes(top / train_annotations, top / train_images, skip_bad_boxes)
    test = coco_boxes(top / test_annotations, top / test_images, skip_bad_boxes)
    return splits_of("coco_detection", train, test, image_size, str(top), train_annotations, test_annotations)


@register_dataset("voc_detection")
def voc_detection(
    root: str = "data",
    download: bool = False,
    year: str = "2012",
    train_set: str = "train",
    test_set: str = "val",
    image_size: ImageSide = 320,
    skip_bad_boxes: bool = False,
) -> DataSplits:
    """Pascal VOC's 20 classes from `root/VOCdevkit/VOC<year>/` (torchvision's VOCDetection; `download`
    fetches it), `train_set` to train and `test_set` to test (ImageSets/Main lists)."""
    train = voc_boxes(absolute(root), year, train_set, download, skip_bad_boxes)
    test = voc_boxes(absolute(root), year, test_set, download, skip_bad_boxes)
    return splits_of("voc_detection", train, test, image_size, year, train_set, test_set)


@register_dataset("yolo_detection")
def yolo_detection(
    root: str = "data/yolo",
    download: bool = False,
    class_names: list[str] | None = None,
    train_split: str = "train",
    test_split: str = "val",
    image_size: ImageSide = 320,
    skip_bad_boxes: bool = False,
) -> DataSplits:
    """A YOLO folder (images/<split>/, labels/<split>/ of `class cx cy w h` lines); the class names from
    `class_names` or the folder's data.yaml (`names`, a list or an index -> name map)."""
    top = Path(absolute(root))
    if download:
        raise KdError("dataset=yolo_detection reads your own folder; there is nothing to download")
    check_yolo_root(top)  # (before data.yaml: a wrong root is not a missing data.yaml)
    if class_names is None:  # (left out: the folder's own data.yaml names the classes)
        names = yaml_class_names(top)
    elif not class_names:
        raise KdError(
            "dataset.class_names=[] lists no class; give the names (dataset.class_names=[cat,dog]), "
            "or leave it out to read data.yaml"
        )
    else:
        names = unique_names([str(n) for n in class_names], "dataset.class_names")
    train = yolo_boxes(top, train_split, names, skip_bad_boxes)
    test = yolo_boxes(top, test_split, names, skip_bad_boxes)
    return splits_of("yolo_detection", train, test, image_size, str(top), train_split, test_split)


def yaml_class_names(root: Path) -> list[str]:
    """data.yaml's `names` (Ultralytics writes a list or a {index: name} map), in index order."""
    import yaml

    path = root / "data.yaml"
    if not path.is_file():
        raise KdError(
            f"{path} not found: a YOLO folder names its classes in data.yaml (`names: [cat, dog]`); "
            "add it, or give dataset.class_names=[...]"
        )
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise KdError(f"{path} is not readable YAML ({str(error).splitlines()[0]}); fix it") from None
    names = document.get("names") if isinstance(document, dict) else None
    if isinstance(names, dict) and all(isinstance(k, int) for k in names) and sorted(names) == list(range(len(names))):
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise KdError(
            f"{path} has no usable `names` (a list of class names, or a map 0: name, 1: name, ... without gaps); fix it"
        )
    return unique_names([str(n) for n in names], f"{path}: `names`")


def unique_names(names: list[str], source: str) -> list[str]:
    """`names` when no two classes share one: a class list's name is how scores and results tell classes
    apart, and `[cat, cat]` is most often a slip for `[cat, dog]`, so it is refused, not trained on."""
    twice = repeated(names)
    if twice:
        raise KdError(
            f"{source} lists {first_few([repr(n) for n in twice])} more than once; give each class its own name"
        )
    return names


for _set in (coco_detection, voc_detection, yolo_detection):
    _set.task = "detection"  # type: ignore[attr-defined]
    _set.image_channels = 3  # type: ignore[attr-defined]
