"""Segmentation data on disk, in the formats people have: Pascal VOC (read by torchvision's
`VOCSegmentation`: JPEG images, palette PNG masks, 255 on object borders = ignored) and a folder pair
(`images/` + `masks/`, a mask per image by file stem, with a class list).

Images and masks are read whole, checked, and resized to `image_size` x `image_size` (images bilinear,
masks nearest: a label is never blended), then held in memory as uint8 like the other in-memory sets; a
split is therefore scored at `image_size`, not at each label's own resolution (a streamed loader that
scores at full resolution is the next step). Every mask is checked before anything trains: another size
than its image, a value that is neither a class nor 255, a missing or unreadable file is one line naming
the file, or, with `skip_bad_masks=true`, the pair is left out and counted in one warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F

from kd_cli.data.base import DataSplits, SplitSeed, TensorSplit, absolute, register_dataset, tensor_splits
from kd_cli.data.images import UnreadableImage, decode_rgb
from kd_cli.data.on_disk import open_or_explain, shown_path
from kd_cli.errors import KdError, warn
from kd_cli.registry import OpenFraction, Range
from kd_cli.tasks import IGNORE_INDEX

ImageSide = Annotated[int, Range(8, 4096)]
VOC_CLASSES = [
    *("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow"),
    *("diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"),
]
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
SHOWN = 3


class BadMask(KdError):
    """A mask that cannot be trained on, named with what is wrong (one line)."""


def read_mask(path: str) -> np.ndarray:
    """The class index of every pixel: a palette PNG's indices, a grey PNG's values (never RGB colours)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            if picture.mode not in ("P", "L", "I", "I;16", "1"):
                raise BadMask(
                    f"mask {shown_path(path)} is a {picture.mode} image; a mask holds one class index per pixel "
                    "(a palette or greyscale PNG)"
                )
            return np.array(picture, dtype=np.int64)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise BadMask(f"cannot read mask {shown_path(path)} ({error})") from None


def mask_file(path: str) -> np.ndarray:
    """A mask stored as class indices (255 ignored), the file named if it is missing."""
    if not os.path.isfile(path):
        raise BadMask(f"no mask {shown_path(path)} for its image")
    return read_mask(path)


# A split's pair: (image file, mask key); a data set's `load_mask(key)` gives the class index of every
# pixel (a file read as stored, a file whose values are mapped, or a mask drawn from annotations).
MaskLoader = Callable[[str], np.ndarray]


def check_mask(mask: np.ndarray, image_size: tuple[int, int], mask_key: str, classes: int) -> None:
    """A mask of its image's (height, width), holding classes and the ignore index only."""
    if tuple(mask.shape) != tuple(image_size):
        raise BadMask(
            f"mask {shown_path(mask_key)} is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image_size[1]}x{image_size[0]}; a mask labels its image's pixels one for one"
        )
    values = np.unique(mask)
    outside = values[(values >= classes) & (values != IGNORE_INDEX)]
    if len(outside):
        raise BadMask(
            f"mask {shown_path(mask_key)} holds value {int(outside[0])}, neither one of the {classes} classes "
            f"(0..{classes - 1}) nor {IGNORE_INDEX} (ignored)"
        )


def read_full_pair(image_path: str, mask_key: str, load_mask: MaskLoader) -> tuple[torch.Tensor, np.ndarray]:
    """An image (uint8 (3, H, W)) and its mask as stored, a decoding failure named as a bad pair."""
    mask = load_mask(mask_key)
    try:
        image = decode_rgb(image_path)
    except UnreadableImage as error:
        raise BadMask(str(error)) from None
    return image, mask


def read_pair(
    image_path: str, mask_key: str, classes: int, side: int, load_mask: MaskLoader = mask_file
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (image, mask) checked and resized: uint8 (3, side, side) and uint8 (side, side)."""
    image, mask = read_full_pair(image_path, mask_key, load_mask)
    check_mask(mask, (image.shape[-2], image.shape[-1]), mask_key, classes)
    resized = F.interpolate(
        image[None].float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False
    )
    label = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(side, side), mode="nearest")
    return resized[0].round().clamp(0, 255).to(torch.uint8), label[0, 0].to(torch.uint8)


def read_split(
    pairs: list[tuple[str, str]], classes: int, side: int, skip: bool, title: str, load_mask: MaskLoader = mask_file
) -> TensorSplit:
    images, masks, bad = [], [], []
    for image_path, mask_key in pairs:
        try:
            image, mask = read_pair(image_path, mask_key, classes, side, load_mask)
        except BadMask as error:
            if not skip:
                raise KdError(
                    f"{error}; fix or remove it, or pass dataset.skip_bad_masks=true to leave such pairs out"
                ) from None
            bad.append(str(error))
            continue
        images.append(image)
        masks.append(mask)
    if bad:
        warn(f"{title}: left out {len(bad)} image(s) with a bad mask: " + "; ".join(bad[:SHOWN]))
    if not images:
        raise KdError(f"{title}: no image with a usable mask; check the files and the class list")
    return TensorSplit(torch.stack(images), torch.stack(masks))


def segmentation_splits(
    titled_pairs: list[tuple[str, list[tuple[str, str]]]],
    class_names: list[str],
    side: int,
    skip: bool,
    stream: bool,
    *extra: str,
    load_mask: MaskLoader = mask_file,
) -> DataSplits:
    """The (train, test) splits of (title, pairs): read into memory at side x side, or, with `stream`, scanned
    and streamed from disk (data/mask_stream.py). `extra`: what else names the data (its fingerprint)."""
    classes = len(class_names)
    if stream:
        from kd_cli.data.mask_stream import scan_split, streamed_splits

        train, test = (scan_split(pairs, classes, side, skip, title, load_mask) for title, pairs in titled_pairs)
        return streamed_splits(train, test, class_names, *extra)
    train_t, test_t = (read_split(pairs, classes, side, skip, title, load_mask) for title, pairs in titled_pairs)
    return tensor_splits(train_t, test_t, class_names, *extra, task="segmentation")


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


@register_dataset("seg_folder")
def seg_folder(
    root: str = "data/seg_folder",
    download: bool = False,
    classes: list[str] | None = None,
    image_size: ImageSide = 256,
    test_fraction: OpenFraction = 0.2,
    split_seed: SplitSeed = 0,
    skip_bad_masks: bool = False,
    stream: bool = False,
) -> DataSplits:
    """`root/images/` + `root/masks/` (a mask per image, same stem, PNG), split by `test_fraction`; or
    `root/train/` and `root/test/` each holding such a pair. The class names: `classes`, else the lines
    of `root/classes.txt` (class i on line i + 1; mask value i)."""
    top = Path(absolute(root))
    names = list(classes) if classes else _class_file(top)
    if len(names) < 2:
        raise KdError(f"dataset=seg_folder: {len(names)} class name(s); give at least 2 (background counts)")
    if (top / "train").is_dir() and (top / "test").is_dir():
        train_pairs, test_pairs = _pairs(top / "train"), _pairs(top / "test")
    else:
        pairs = _pairs(top)
        order = np.random.default_rng(split_seed).permutation(len(pairs))
        cut = max(1, round(len(pairs) * test_fraction))
        if cut >= len(pairs):
            raise KdError(f"dataset=seg_folder: {len(pairs)} image(s) leave none to train on; add images")
        test_pairs, train_pairs = [pairs[i] for i in sorted(order[:cut])], [pairs[i] for i in sorted(order[cut:])]
    titled = [("seg_folder train", train_pairs), ("seg_folder test", test_pairs)]
    listing = [path for pair in train_pairs + test_pairs for path in pair]
    return segmentation_splits(titled, names, image_size, skip_bad_masks, stream, *listing, str(image_size))


def _class_file(top: Path) -> list[str]:
    path = top / "classes.txt"
    if not path.is_file():
        raise KdError(
            f"dataset=seg_folder: no class list; give dataset.classes=[background,...] or write {path} "
            "(one name per line, line i + 1 for mask value i)"
        )
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _pairs(folder: Path) -> list[tuple[str, str]]:
    """(image, mask) paths under folder/images and folder/masks, matched by file stem, sorted."""
    images, masks = folder / "images", folder / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise KdError(
            f"dataset=seg_folder: {folder} has no images/ and masks/ folders (expected images/NAME.jpg with "
            "masks/NAME.png, or train/ and test/ each holding both)"
        )
    by_stem = {path.stem: path for path in masks.iterdir() if path.suffix.lower() in MASK_SUFFIXES}
    found = sorted(p for p in images.iterdir() if p.is_file() and not p.name.startswith("."))
    if not found:
        raise KdError(f"dataset=seg_folder: {images} holds no images")
    return [(str(path), str(by_stem.get(path.stem, masks / f"{path.stem}.png"))) for path in found]


for _loader in (voc_segmentation, seg_folder):
    _loader.task = "segmentation"  # type: ignore[attr-defined]  # data.base.dataset_task
    _loader.image_channels = 3  # type: ignore[attr-defined]  # base.expected_channels
