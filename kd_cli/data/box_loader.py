"""Batches of a detection split: normalised float images (B, C, H, W) on the device and, per image, a
target dict as torchvision's detectors take it (`boxes` (k, 4) x1 y1 x2 y2, `labels` (k,)) plus what
scoring needs (`image_id`, `size` (H, W) of the image as the data has it, `scale`: model pixels per pixel
of the data's own image).

Training batches are shuffled and augmented from (seed, epoch) like the in-memory classification
loader's: a random shift within `crop_padding` pixels (the image padded with black; boxes moved with it,
clipped to the image, dropped when less than a pixel wide or high remains) and a horizontal flip (boxes
mirrored). Rotation would turn boxes into shapes that are not boxes, so it is refused for detection.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kd_cli.data.augment import Augmentation, random_erase
from kd_cli.data.base import BoxSplit
from kd_cli.data.order import InMemoryBatches
from kd_cli.errors import KdError

Targets = list[dict[str, Any]]


def check_box_augmentation(spec: Augmentation) -> None:
    if spec.rotate_degrees:
        raise KdError(
            f"augmentation.rotate_degrees={spec.rotate_degrees}: a rotated box is no longer an axis-aligned box; "
            "set augmentation.rotate_degrees=0 for detection"
        )
    if spec.trivial_augment:
        raise KdError("augmentation.trivial_augment is for classification image folders; set it to false for detection")


class BoxLoader(InMemoryBatches):
    """Shuffles, slices, augments and normalises an in-memory detection split on its device."""

    kind = "boxes"

    def __init__(
        self,
        split: BoxSplit,
        batch_size: int,
        spec: Augmentation | None,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        seed: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        shuffle: bool,
    ):
        if spec is not None:
            check_box_augmentation(spec)
        channels = split.images.shape[1]
        super().__init__(
            len(split), channels, batch_size, spec, mean, std, device, seed, drop_last, rank, world_size, shuffle
        )
        self.images = split.images.to(device)
        self.boxes = [b.to(device) for b in split.boxes]
        self.labels = [lab.to(device) for lab in split.labels]
        self.image_ids = list(split.image_ids)
        self.scales = list(split.scales) if split.scales is not None else [1.0] * len(split)
        side = tuple(split.images.shape[-2:])
        self.sizes = list(split.sizes) if split.sizes is not None else [side] * len(split)
        self.crowds = [c.to(device) for c in split.crowds] if split.crowds is not None else None
        if shuffle and self.crowds is not None:  # training: crowd regions are not objects to learn
            kept = [~c for c in self.crowds]
            self.boxes = [b[k] for b, k in zip(self.boxes, kept)]
            self.labels = [lab[k] for lab, k in zip(self.labels, kept)]
            self.crowds = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Targets]]:
        order = self.epoch_order()
        generator = self.augment_generator()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size].tolist()
            images = self.images[torch.as_tensor(index, device=self.device)]
            boxes = [self.boxes[i] for i in index]
            if self.spec is not None:
                images, boxes = augment_boxes(images, boxes, self.spec, generator)
            else:
                images = images.float().div_(255.0)
            images = images.sub_(self.mean).div_(self.std)
            yield images, [self._target(i, b) for i, b in zip(index, boxes)]

    def _target(self, i: int, boxes: torch.Tensor) -> dict[str, Any]:
        labels = self.labels[i]
        if boxes.shape[1] == 5:  # the augmentation dropped boxes: the labels of those left
            labels = labels[boxes[:, 4].long()]
        target = {
            "boxes": boxes[:, :4].contiguous(),
            "labels": labels,
            "image_id": self.image_ids[i],
            "size": self.sizes[i],
            "scale": self.scales[i],
        }
        if self.crowds is not None:
            target["crowd"] = self.crowds[i]
        return target


def augment_boxes(
    images: torch.Tensor, boxes: list[torch.Tensor], spec: Augmentation, generator: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """uint8 images -> float in [0, 1], shifted and flipped per sample with their boxes. A box list that
    loses boxes comes back with a fifth column: the index of each kept box in the original list."""
    batch, _, height, width = images.shape
    x = images.float().div_(255.0)
    if spec.crop_padding:
        x, boxes = _shift(x, boxes, spec.crop_padding, generator)
    if spec.hflip:
        flip = (torch.rand(batch, generator=generator, device=x.device) < 0.5).tolist()
        x = torch.where(torch.tensor(flip, device=x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        boxes = [_mirror(b, width) if f else b for b, f in zip(boxes, flip)]
    if spec.erase_prob:
        x = random_erase(x, spec.erase_prob, generator)
    return x, boxes


def _shift(
    x: torch.Tensor, boxes: list[torch.Tensor], padding: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each image moved by (dx, dy) in [-padding, padding] (uncovered pixels black), its boxes with it."""
    batch, _, height, width = x.shape
    offsets = torch.randint(-padding, padding + 1, (batch, 2), generator=generator, device=x.device).tolist()
    padded = F.pad(x, (padding, padding, padding, padding))
    shifted = torch.stack(
        [
            padded[i, :, padding - dy : padding - dy + height, padding - dx : padding - dx + width]
            for i, (dx, dy) in enumerate(offsets)
        ]
    )
    moved = []
    for b, (dx, dy) in zip(boxes, offsets):
        kept_index = b[:, 4] if b.shape[1] == 5 else torch.arange(len(b), device=b.device, dtype=b.dtype)
        xy = b[:, :4] + torch.tensor([dx, dy, dx, dy], device=b.device, dtype=b.dtype)
        xy[:, 0::2] = xy[:, 0::2].clamp(0, width)
        xy[:, 1::2] = xy[:, 1::2].clamp(0, height)
        keep = ((xy[:, 2] - xy[:, 0]) >= 1) & ((xy[:, 3] - xy[:, 1]) >= 1)
        moved.append(
            xy[keep] if bool(keep.all()) and b.shape[1] == 4 else torch.cat([xy, kept_index[:, None]], 1)[keep]
        )
    return shifted, moved


def _mirror(boxes: torch.Tensor, width: int) -> torch.Tensor:
    mirrored = boxes.clone()
    mirrored[:, 0], mirrored[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return mirrored
