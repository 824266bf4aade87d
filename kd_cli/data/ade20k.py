"""ADE20K scene parsing (`dataset=ade20k`): the 150-class SceneParsing benchmark (MIT's ADEChallengeData2016),
from `root/ADEChallengeData2016/images/{training,validation}/*.jpg` with
`annotations/{training,validation}/*.png` (same stem).

A stored mask value v in 1..150 is class v - 1; 0 ("other objects", not one of the 150) is ignored, as
the benchmark scores it (mmsegmentation's `reduce_zero_label`). `training` trains, `validation` tests.
`dataset.download=true` fetches the archive (923 MB) with torchvision's download code.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kd_cli.data.base import DataSplits, absolute, register_dataset
from kd_cli.data.mask_stream import segmentation_splits
from kd_cli.data.masks import BadMask, ImageSide, read_mask
from kd_cli.data.on_disk import brief, shown_path
from kd_cli.errors import KdError
from kd_cli.tasks import IGNORE_INDEX

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
FOLDER = "ADEChallengeData2016"
# The benchmark's 150 classes, in mask value order (value 1 = wall); the names of its objectInfo150 list.
ADE20K_CLASSES = [
    *("wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet"),
    *("sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water"),
    *("painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence"),
    *("desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column"),
    *("signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator"),
    *("grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway"),
    *("river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench"),
    *("countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar"),
    *("arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning"),
    *("streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land"),
    *("bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain"),
    *("conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket"),
    *("waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name"),
    *("microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood"),
    *("sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor"),
    *("bulletin board", "shower", "radiator", "glass", "clock", "flag"),
]


def ade_mask(path: str) -> np.ndarray:
    """Stored 0..150 -> class 0..149, 0 (not one of the 150) -> ignored."""
    if not os.path.isfile(path):
        raise BadMask(f"no annotation {shown_path(path)} for its image")
    stored = read_mask(path)
    if stored.max(initial=0) > len(ADE20K_CLASSES):
        raise BadMask(
            f"mask {shown_path(path)} holds value {int(stored.max())}; ADE20K scene-parsing masks hold 0 "
            f"(unlabelled) to {len(ADE20K_CLASSES)}"
        )
    return np.where(stored == 0, IGNORE_INDEX, stored - 1)


@register_dataset("ade20k")
def ade20k(
    root: str = "data",
    download: bool = False,
    image_size: ImageSide = 512,
    skip_bad_masks: bool = False,
    stream: bool = False,
) -> DataSplits:
    """`training` to train, `validation` to test, at `image_size` x `image_size`."""
    top = Path(absolute(root)) / FOLDER
    if not (top / "images").is_dir():
        _fetch_or_explain(top, download)
    titled = []
    for split in ("training", "validation"):
        images = top / "images" / split
        if not images.is_dir():
            raise KdError(f"ADE20K: {images} is missing (expected images/{split}/ and annotations/{split}/)")
        found = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not found:
            raise KdError(f"ADE20K: {images} holds no images")
        pairs = [(str(p), str(top / "annotations" / split / f"{p.stem}.png")) for p in found]
        titled.append((f"ADE20K {split}", pairs))
    extra = ("ade20k", str(image_size))
    return segmentation_splits(titled, ADE20K_CLASSES, image_size, skip_bad_masks, stream, *extra, load_mask=ade_mask)


def _fetch_or_explain(top: Path, download: bool) -> None:
    if not download:
        raise KdError(
            f"ADE20K not found under {top} (expected images/ and annotations/, each with training/ and "
            "validation/); put the files there or run with dataset.download=true (923 MB; needs internet)"
        )
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(URL, str(top.parent))  # MIT publishes no checksum for it
    except Exception as error:  # URLError, OSError, a checksum mismatch: all mean "no usable archive"
        raise KdError(
            f"ADE20K: downloading {URL} into {top.parent} failed ({brief(error)}); check the internet "
            "connection, or unpack ADEChallengeData2016.zip there by hand"
        ) from error


ade20k.task = "segmentation"  # type: ignore[attr-defined]  # data.base.dataset_task
ade20k.image_channels = 3  # type: ignore[attr-defined]  # base.expected_channels
