"""COCO-style masks (`dataset=coco_segmentation`): semantic masks drawn from a COCO instance annotation file
(`root/annotations/instances_{train,val}<year>.json` beside `root/{train,val}<year>/`), parsed and
rasterised by pycocotools (polygons, RLE and uncompressed RLE alike).

Class 0 is the background; the chosen categories (`categories`, by name; all of the file's when empty)
follow in the file's category id order, so ids with gaps (COCO's 1..90 for 80 classes) become contiguous
class indices. Pixels claimed by objects of two different classes and `iscrowd` regions are ignored (255),
as torchvision's segmentation reference does for overlaps. `categories=[aeroplane, ...]` with
`annotated_only=true` gives the COCO subset of the 20 Pascal VOC classes that torchvision's
and torchdistill's segmentation recipes train on.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kd_cli.data.base import DataSplits, absolute, register_dataset
from kd_cli.data.mask_stream import segmentation_splits
from kd_cli.data.masks import BadMask, ImageSide
from kd_cli.data.on_disk import brief, shown_path
from kd_cli.errors import KdError
from kd_cli.registry import PositiveInt
from kd_cli.tasks import IGNORE_INDEX

INSTALL = "pip install 'kd-cli[coco]'"


def open_annotations(path: Path, task: str = "segmentation"):
    """pycocotools' COCO index of one annotation file, or one line saying why it cannot be read."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise KdError(f"COCO {task} data is read with pycocotools: {INSTALL}") from None
    if not path.is_file():
        raise KdError(f"COCO annotations {path} not found (expected annotations/instances_<split><year>.json)")
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            return COCO(str(path))
    except Exception as error:  # JSONDecodeError, KeyError of a file that is not COCO's layout, ...
        raise KdError(
            f"COCO annotations {shown_path(path)} cannot be read ({brief(error)}); is it COCO JSON?"
        ) from None


def choose_categories(coco, wanted: list[str], path: Path) -> tuple[dict[int, int], list[str]]:
    """category id -> class index (1..K, in id order) and the class names, background first."""
    categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    by_name = {c["name"]: c["id"] for c in categories}
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise KdError(
            f"dataset.categories: {', '.join(unknown)} not in {path.name} (it has: {', '.join(list(by_name)[:12])}"
            f"{', ...' if len(by_name) > 12 else ''})"
        )
    kept = [c for c in categories if not wanted or c["name"] in wanted]
    if not kept:
        raise KdError(f"{path.name} lists no categories; a COCO annotation file names them under 'categories'")
    return {c["id"]: i + 1 for i, c in enumerate(kept)}, ["background", *(c["name"] for c in kept)]


def semantic_mask(coco, image_id: int, label_of: dict[int, int], where: str) -> np.ndarray:
    """Each pixel's class from the image's annotations; overlaps of two classes and crowds ignored."""
    info = coco.imgs[image_id]
    height, width = int(info["height"]), int(info["width"])
    mask = np.zeros((height, width), dtype=np.int64)
    unsure = np.zeros((height, width), dtype=bool)
    for annotation in coco.imgToAnns.get(image_id, []):
        category = annotation.get("category_id")
        if category not in coco.cats:
            raise BadMask(f"{where}: annotation {annotation.get('id')} has category_id {category}, not in 'categories'")
        if category not in label_of:
            continue
        try:
            with warnings.catch_warnings():  # pycocotools 2.0 on numpy 2: a DeprecationWarning per mask
                warnings.simplefilter("ignore", DeprecationWarning)
                drawn = coco.annToMask(annotation).astype(bool)
        except Exception as error:  # a polygon with too few points, an RLE of another size, ...
            raise BadMask(f"{where}: annotation {annotation.get('id')} cannot be drawn ({brief(error, 80)})") from None
        if annotation.get("iscrowd"):
            unsure |= drawn
            continue
        label = label_of[category]
        unsure |= drawn & (mask != 0) & (mask != label)
        mask[drawn] = label
    mask[unsure] = IGNORE_INDEX
    return mask


@register_dataset("coco_segmentation")
def coco_segmentation(
    root: str = "data/coco",
    download: bool = False,
    year: str = "2017",
    categories: list[str] | None = None,
    annotated_only: bool = False,
    max_images: PositiveInt | None = None,
    image_size: ImageSide = 256,
    skip_bad_masks: bool = False,
    stream: bool = False,
) -> DataSplits:
    """`train<year>` to train, `val<year>` to test; `max_images` caps each split (first by image id);
    `annotated_only`: leave out training images with no object of the chosen categories."""
    top = Path(absolute(root))
    if download:
        raise KdError(
            "dataset=coco_segmentation does not download COCO (19 GB): get train2017.zip, val2017.zip and "
            f"annotations_trainval2017.zip from https://cocodataset.org, unpack them in {top}, and run without "
            "dataset.download"
        )
    titled: list[tuple[str, list[tuple[str, str]]]] = []
    names: list[str] = []
    drawn = AnnotatedMasks()
    for split in ("train", "val"):
        path = top / "annotations" / f"instances_{split}{year}.json"
        coco = open_annotations(path)
        label_of, names = choose_categories(coco, list(categories or []), path)
        ids = sorted(coco.imgs)
        if annotated_only and split == "train":
            ids = [i for i in ids if any(a.get("category_id") in label_of for a in coco.imgToAnns.get(i, []))]
        ids = ids[:max_images] if max_images else ids
        if not ids:
            raise KdError(f"{path.name} lists no images{' with the chosen categories' if annotated_only else ''}")
        keys = [drawn.add(f"{path.name} (image id {i})", coco, i, label_of) for i in ids]
        pairs = [(os.path.join(top, f"{split}{year}", coco.imgs[i]["file_name"]), k) for i, k in zip(ids, keys)]
        titled.append((f"COCO {split}{year}", pairs))
    extra = ("coco", year, str(image_size))
    return segmentation_splits(titled, names, image_size, skip_bad_masks, stream, *extra, load_mask=drawn)


class AnnotatedMasks:
    """`load_mask` of the COCO splits: a mask key (the file and image id, as messages name it) -> its mask,
    drawn from that image's annotations when asked."""

    def __init__(self) -> None:
        self.images: dict[str, tuple[Any, int, dict[int, int]]] = {}

    def add(self, key: str, coco, image_id: int, label_of: dict[int, int]) -> str:
        self.images[key] = (coco, image_id, label_of)
        return key

    def __call__(self, key: str) -> np.ndarray:
        coco, image_id, label_of = self.images[key]
        return semantic_mask(coco, image_id, label_of, key)


coco_segmentation.task = "segmentation"  # type: ignore[attr-defined]  # data.base.dataset_task
coco_segmentation.image_channels = 3  # type: ignore[attr-defined]  # base.expected_channels
