"""Segmentation pairs streamed from disk (`dataset.stream=true` on every segmentation data set on disk): for
sets too large to hold in memory, and to score each test image at its label's full resolution.

Before anything trains, every mask is read once and checked against its image's size (read from the
image's header) and the class list, as the in-memory path checks it: a bad pair is one line naming the
file, or left out and counted with `skip_bad_masks=true`; the pixels per class found on the way feed the
degenerate-split checks (data/checks.py). Then, per sample, in the DataLoader's workers, through
torchvision.transforms.v2 with the mask as a `tv_tensors.Mask` (resized by nearest neighbour, padded
with 255):
- training: a random scale in [0.5, 2.0] of the stored size (with crop augmentation, as CIRKD and
  mmsegmentation train), a random image_size x image_size crop (padded where the scaled image is smaller:
  black image, ignored mask), the flip and rotation the augmentation asks for;
- evaluation: the image whole, at its stored size, one per batch, scored against its mask as stored.
`segmentation_splits` is what every segmentation data set on disk calls: into memory, or streamed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from kd_cli.data.augment import Augmentation
from kd_cli.data.base import DataSplits, FolderSplit, fingerprint, tensor_splits
from kd_cli.data.masks import BadMask, MaskLoader, check_mask, mask_file, read_full_pair, read_split, usable_pairs
from kd_cli.data.on_disk import shown_path
from kd_cli.errors import KdError
from kd_cli.tasks import IGNORE_INDEX

SCALES = (0.5, 2.0)  # training's random rescaling of the stored image, with crop augmentation on


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
        train, test = (scan_split(pairs, classes, side, skip, title, load_mask) for title, pairs in titled_pairs)
        return streamed_splits(train, test, class_names, *extra)
    train_t, test_t = (read_split(pairs, classes, side, skip, title, load_mask) for title, pairs in titled_pairs)
    return tensor_splits(train_t, test_t, class_names, *extra, task="segmentation")


class MaskPairs(Dataset):
    """(uint8 image (3, H, W), uint8 mask (H, W)) at their stored size, read per item."""

    def __init__(self, pairs: list[tuple[str, str]], load_mask: MaskLoader, class_pixels: torch.Tensor):
        self.pairs, self.load_mask = pairs, load_mask
        self.class_pixels = class_pixels  # pixels per mask value 0..255 over the split, counted by the scan

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_key = self.pairs[index]
        try:
            image, mask = read_full_pair(image_path, mask_key, self.load_mask)
        except BadMask as error:  # changed on disk since the scan: the same one line, from the worker
            raise KdError(str(error)) from None
        return image, torch.from_numpy(mask.astype(np.uint8))


def scan_split(
    pairs: list[tuple[str, str]], classes: int, side: int, skip: bool, title: str, load_mask: MaskLoader = mask_file
) -> FolderSplit:
    """Every mask read and checked against its image's size; the split to stream."""

    def pixels_per_value(image_path: str, mask_key: str) -> torch.Tensor:  # (not the mask: thousands may pass)
        mask = load_mask(mask_key)
        check_mask(mask, _stored_size(image_path), mask_key, classes)
        return torch.bincount(torch.from_numpy(mask.astype(np.int64)).flatten(), minlength=256)[:256]

    usable = usable_pairs(pairs, skip, title, pixels_per_value)
    kept = [pair for pair, _ in usable]
    pixels = torch.stack([counts for _, counts in usable]).sum(dim=0)
    return FolderSplit(MaskPairs(kept, load_mask, pixels), image_size=side, task="segmentation")


def streamed_splits(train: FolderSplit, test: FolderSplit, class_names: list[str], *extra: str) -> DataSplits:
    """DataSplits of two streamed segmentation splits; the fingerprint lists the files, their sizes and keys."""
    listing = [part for split in (train, test) for part in _listing(split)]
    return DataSplits(
        train=train,
        test=test,
        num_classes=len(class_names),
        class_names=list(class_names),
        in_channels=3,
        input_size=train.image_size,
        fingerprint=fingerprint(*class_names, *listing, *extra, "stream"),
        task="segmentation",
    )


def class_pixels(split: FolderSplit) -> torch.Tensor | None:
    """Pixels per mask value of a streamed split (through Subsets: the whole split's, an upper bound)."""
    dataset = split.dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset.class_pixels if isinstance(dataset, MaskPairs) else None


def _listing(split: FolderSplit) -> list[str]:
    pairs = cast(MaskPairs, split.dataset).pairs
    return [f"{image}:{_file_size(image)}:{mask}" for image, mask in pairs]


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _stored_size(path: str) -> tuple[int, int]:
    """(height, width) from the image file's header, without decoding it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            width, height = picture.size
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise BadMask(f"cannot read image {shown_path(path)} ({error})") from None
    return height, width


class SegmentationPairs:
    """The per-sample transform of a streamed pair (see the module's docstring): training when `spec` is
    given, evaluation otherwise. Draws from torch's global RNG, which the loader seeds per worker/batch."""

    def __init__(self, spec: Augmentation | None, size: int, mean: Sequence[float], std: Sequence[float]):
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.spec, self.size, self.mean, self.std = spec, size, list(mean), list(std)
        steps: list = []
        if spec is not None:
            fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
            steps.append(v2.RandomCrop(size, pad_if_needed=True, fill=fill))
            if spec.hflip:
                steps.append(v2.RandomHorizontalFlip())
            if spec.rotate_degrees:
                steps.append(v2.RandomRotation(spec.rotate_degrees, fill=fill))
        self.crop = v2.Compose(steps) if steps else None

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.spec is not None and self.spec.crop_padding:
            scale = SCALES[0] + (SCALES[1] - SCALES[0]) * float(torch.rand(()))
            height, width = image.shape[-2:]
            size = [max(1, round(height * scale)), max(1, round(width * scale))]
            image, mask = TF.resize(image, size, antialias=True), TF.resize(mask, size)  # a Mask: nearest
        if self.crop is not None:
            image, mask = self.crop(image, mask)
        pixels = TF.normalize(TF.to_dtype(image, torch.float32, scale=True), self.mean, self.std)
        return pixels.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


class PairTransformed(Dataset):
    """Applies a pair transform to each (image, mask) of a split; the split itself stays transform-free."""

    def __init__(self, dataset: Dataset, transform: SegmentationPairs):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(cast(MaskPairs, self.dataset))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.dataset[index]
        return self.transform(image, mask)
