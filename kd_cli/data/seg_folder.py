"""`dataset=seg_folder`: the user's own masks, `images/` + `masks/` (a mask per image by file stem, palette
or greyscale PNG: one class index per pixel, 255 ignored) with a class list, in memory or streamed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kd_cli.data.base import DataSplits, SplitSeed, absolute, register_dataset
from kd_cli.data.mask_stream import segmentation_splits
from kd_cli.data.masks import MASK_SUFFIXES, ImageSide
from kd_cli.errors import KdError
from kd_cli.registry import OpenFraction


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


seg_folder.task = "segmentation"  # type: ignore[attr-defined]  # data.base.dataset_task
seg_folder.image_channels = 3  # type: ignore[attr-defined]  # base.expected_channels
