"""Image folders (torchvision's ImageFolder): data too large for memory, streamed from disk.

Layouts accepted under `root`: `train/` plus `test/` (or `val/`), each holding one folder per class;
or class folders alone, which are split into train and test by `test_fraction` and `split_seed`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

from kd_cli.data.base import DataSplits, FolderSplit, absolute, fingerprint, register_dataset
from kd_cli.data.files import brief
from kd_cli.errors import KdError

LAYOUT = "train/ and test/ (or val/) folders of class folders, or class folders alone"


@register_dataset("imagefolder")
def imagefolder(
    root: str = "data/imagefolder",
    download: bool = False,
    image_size: int = 224,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> DataSplits:
    """`image_size` is the side of the square crops the model sees."""
    root = absolute(root)
    if download:
        raise KdError("an image folder cannot be downloaded; set dataset.download=false and put the images "
                      f"under {root} ({LAYOUT})")
    if not os.path.isdir(root):
        raise KdError(f"image folder not found: {root} (expected {LAYOUT}); set dataset.root=PATH")
    if os.path.isdir(os.path.join(root, "train")):
        train, test = _official_split(root)
    else:
        train, test = _random_split(_image_folder(root), test_fraction, split_seed)
    classes = _base(train).classes
    return DataSplits(
        train=FolderSplit(train, image_size),
        test=FolderSplit(test, image_size),
        num_classes=len(classes),
        class_names=list(classes),
        in_channels=3,  # ImageFolder's loader converts every image to RGB
        input_size=image_size,
        fingerprint=fingerprint(*classes, *_digest(train, root), *_digest(test, root)),
    )


def _official_split(root: str) -> tuple[ImageFolder, ImageFolder]:
    test_dir = next((os.path.join(root, n) for n in ("test", "val") if os.path.isdir(os.path.join(root, n))), None)
    if test_dir is None:
        raise KdError(f"{root} has train/ but no test/ or val/ folder; add one (same class folders as train/)")
    train, test = _image_folder(os.path.join(root, "train")), _image_folder(test_dir)
    if train.classes != test.classes:
        odd = sorted(set(train.classes) ^ set(test.classes))
        raise KdError(f"train/ and {os.path.basename(test_dir)}/ under {root} have different class folders "
                      f"(only in one: {', '.join(odd[:5])}); give both the same classes")
    return train, test


def _image_folder(path: str) -> ImageFolder:
    try:
        return ImageFolder(path)
    except OSError as error:  # FileNotFoundError: no class folders, or a class folder without images
        raise KdError(f"cannot read image folder {path} ({brief(error)}); expected {LAYOUT}") from error


def _random_split(folder: ImageFolder, test_fraction: float, seed: int) -> tuple[Subset, Subset]:
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise KdError(f"dataset.test_fraction must be between 0 and 1, got {test_fraction}")
    try:  # stratified, so every class keeps its share in both splits
        train_idx, test_idx = train_test_split(
            np.arange(len(folder)), test_size=test_fraction, stratify=folder.targets, random_state=seed
        )
    except ValueError as error:  # e.g. a class with a single image
        raise KdError(f"cannot split {folder.root} into train and test ({brief(error)}); add images or make "
                      "train/ and test/ folders") from error
    return Subset(folder, sorted(train_idx.tolist())), Subset(folder, sorted(test_idx.tolist()))


def _base(dataset: Dataset) -> ImageFolder:
    return dataset.dataset if isinstance(dataset, Subset) else dataset


def _samples(dataset: Dataset) -> list[tuple[str, int]]:
    if isinstance(dataset, Subset):
        return [dataset.dataset.samples[i] for i in dataset.indices]
    return list(dataset.samples)


def _digest(dataset: Dataset, root: str, files_read: int = 8) -> list[bytes | str]:
    """Labels and relative paths of every image, plus the bytes of a few: no full pass over the disk."""
    samples = _samples(dataset)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64).numpy().tobytes()
    paths = "\n".join(os.path.relpath(path, root) for path, _ in samples)
    step = max(1, len(samples) // files_read)
    contents = [_read(path) for path, _ in samples[::step][:files_read]]
    return [str(len(samples)), labels, paths, *contents]


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()
