"""`dataset=voc_segmentation`: Pascal VOC's segmentation split read by torchvision's `VOCSegmentation` (JPEG
images, palette PNG masks, 255 on object borders = ignored), in memory or streamed (`stream`)."""

from __future__ import annotations

import os

from kd_cli.data.base import DataSplits, absolute, register_dataset
from kd_cli.data.mask_stream import segmentation_splits
from kd_cli.data.masks import ImageSide
from kd_cli.data.on_disk import open_or_explain

VOC_CLASSES = [
    *("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow"),
    *("diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"),
]


@register_dataset("voc_segmentation")
def voc_segmentation(
    root: str = "data",
    download: bool = False,
    year: str = "2012",
    image_size: ImageSide = 256,
    skip_bad_masks: bool = False,
    stream: bool = False,
) -> DataSplits:
    """Pascal VOC's segmentation split (`train` to train, `val` to test) from `root/VOCdevkit/VOC<year>/`,
    listed by torchvision's VOCSegmentation (which also downloads it)."""
    import torchvision.datasets as tv

    folder = os.path.join(absolute(root), "VOCdevkit", f"VOC{year}")
    lists = [os.path.join(folder, "ImageSets", "Segmentation", f"{split}.txt") for split in ("train", "val")]
    train, val = open_or_explain(
        f"VOC{year} segmentation",
        folder,
        "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/train.txt, val.txt",
        lists,
        download,
        lambda: tuple(tv.VOCSegmentation(absolute(root), year, split, download=download) for split in ("train", "val")),
    )
    titled = [(f"VOC{year} {name}", list(zip(ds.images, ds.masks))) for ds, name in ((train, "train"), (val, "val"))]
    return segmentation_splits(titled, VOC_CLASSES, image_size, skip_bad_masks, stream, f"voc{year}", str(image_size))


voc_segmentation.task = "segmentation"  # type: ignore[attr-defined]  # data.base.dataset_task
voc_segmentation.image_channels = 3  # type: ignore[attr-defined]  # base.expected_channels
