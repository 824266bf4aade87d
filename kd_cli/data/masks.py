"""Reading segmentation masks, what every segmentation data set on disk shares: a mask file as class indices
(a palette PNG's indices, a grey PNG's values; never RGB colours), each mask checked against its image
(the same size, classes and 255 = ignored only; a missing or unreadable file named) as `BadMask`, and a
split read into memory, images and masks resized to `image_size` x `image_size` (images bilinear, masks
nearest: a label is never blended) and held as uint8, where it is scored at that size. A pair that is
not usable is one line naming the file, or, with `skip_bad_masks=true`, left out and counted in one warning.
(Streaming from disk, scored at full resolution: data/mask_stream.py.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Annotated, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from kd_cli.data.base import TensorSplit
from kd_cli.data.images import UnreadableImage, decode_rgb
from kd_cli.data.on_disk import shown_path
from kd_cli.errors import KdError, warn
from kd_cli.registry import Range
from kd_cli.tasks import IGNORE_INDEX

ImageSide = Annotated[int, Range(8, 4096)]
T = TypeVar("T")
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


def usable_pairs(
    pairs: list[tuple[str, str]], skip: bool, title: str, read: Callable[[str, str], T]
) -> list[tuple[tuple[str, str], T]]:
    """`read(image_path, mask_key)` of each pair, in order. A bad pair (`BadMask`) stops everything with one
    line, or, with `skip`, is left out and counted in one warning; no usable pair at all is one line too."""
    done: list[tuple[tuple[str, str], T]] = []
    bad: list[str] = []
    for image_path, mask_key in pairs:
        try:
            done.append(((image_path, mask_key), read(image_path, mask_key)))
        except BadMask as error:
            if not skip:
                raise KdError(
                    f"{error}; fix or remove it, or pass dataset.skip_bad_masks=true to leave such pairs out"
                ) from None
            bad.append(str(error))
    if bad:
        warn(f"{title}: left out {len(bad)} image(s) with a bad mask: " + "; ".join(bad[:SHOWN]))
    if not done:
        raise KdError(f"{title}: no image with a usable mask; check the files and the class list")
    return done


def read_split(
    pairs: list[tuple[str, str]], classes: int, side: int, skip: bool, title: str, load_mask: MaskLoader = mask_file
) -> TensorSplit:
    """The usable pairs read into memory at side x side."""
    read = usable_pairs(pairs, skip, title, lambda image, mask: read_pair(image, mask, classes, side, load_mask))
    return TensorSplit(torch.stack([image for _, (image, _) in read]), torch.stack([mask for _, (_, mask) in read]))
