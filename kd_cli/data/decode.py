"""Training batches from an image folder: decoded in C++, cut in the workers, augmented as a batch.

The per-image recipe (a PIL decode, then a chain of transforms per image in the DataLoader workers,
each image sent back as a float tensor) spends most of its time outside the pixels: Python calls per
image and per transform, and four bytes per pixel through the workers' shared memory. Here a worker
gets a whole batch of indices (`__getitems__`), reads each file, decodes JPEG and PNG with TorchCodec
(or torchvision.io without it; other formats through Pillow, restricted to raster formats: `images.py`),
cuts the random-resized crop, resizes it in uint8, flips half of them, and returns one uint8 batch
(as numpy arrays: cheaper to send than tensors). The rest of the augmentation (rotation, erasing),
the float conversion and normalisation run batched in the main process on the training device
(`augment_batch`), as for in-memory data sets.

The crop boxes and flips are drawn from (seed, epoch, sample index), so a batch is the same whatever
the number of workers, and the teacher cache can share it between runs.

Every image is read by `images.decode_rgb`, the one decoding path of kd (its docstring gives the rules
and the safety checks).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from kd_cli.data.images import decode_rgb

SCALE = (0.08, 1.0)  # RandomResizedCrop's defaults: share of the area, and aspect ratio range
RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10
FLIP = 2 * ATTEMPTS  # the column of the uniforms that decides the flip (the last two place the box)


def uniforms(seed: int, epoch: int, indices: list[int], count: int) -> np.ndarray:
    """(len(indices), count) uniforms in [0, 1), each a pure function of (seed, epoch, index, column):
    SplitMix64 over the four, vectorised over the batch (a generator per image would cost more than its crop)."""
    index = np.asarray(indices, dtype=np.uint64)[:, None]
    column = np.arange(count, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        state = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(epoch)
        x = (state + index * np.uint64(0xBF58476D1CE4E5B9) + column * np.uint64(0x94D049BB133111EB)).astype(np.uint64)
        for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x = (x ^ (x >> np.uint64(shift))) * np.uint64(factor)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def random_resized_boxes(heights: np.ndarray, widths: np.ndarray, u: np.ndarray) -> np.ndarray:
    """(top, left, h, w) per image: RandomResizedCrop's boxes (area share, aspect ratio, up to 10
    attempts, then the central crop of the allowed ratios), from the uniforms `u` of `uniforms`."""
    heights, widths = heights[:, None].astype(np.float64), widths[:, None].astype(np.float64)
    area = heights * widths
    target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[:, :ATTEMPTS])
    log_low, log_high = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = np.exp(log_low + (log_high - log_low) * u[:, ATTEMPTS : 2 * ATTEMPTS])
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
    first = fits.argmax(axis=1)
    rows = np.arange(len(u))
    w, h, found = w[rows, first], h[rows, first], fits[rows, first]
    heights, widths = heights[:, 0], widths[:, 0]
    top = np.floor(u[:, -2] * (heights - h + 1))
    left = np.floor(u[:, -1] * (widths - w + 1))
    ratio = widths / heights
    fallback_w = np.where(ratio < RATIO[0], widths, np.where(ratio > RATIO[1], np.rint(heights * RATIO[1]), widths))
    fallback_h = np.where(ratio < RATIO[0], np.rint(widths / RATIO[0]), heights)
    w, h = np.where(found, w, fallback_w), np.where(found, h, fallback_h)
    top = np.where(found, top, (heights - h) // 2)
    left = np.where(found, left, (widths - w) // 2)
    return np.stack([top, left, h, w], axis=1).astype(np.int64)


class CroppedBatches(Dataset):
    """An image folder's training samples, served a batch at a time as uint8 (B, 3, size, size) crops."""

    def __init__(self, samples: list[tuple[str, int]], size: int, seed: int, hflip: bool):
        self.samples, self.size, self.seed, self.hflip = samples, size, seed, hflip
        # The epoch, in shared memory: the loader sets it before each epoch, persistent workers read it.
        self.shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 crops (B, 3, size, size) and int64 labels, as numpy arrays: a worker sends those through
        its pipe by value, which costs less than handing torch tensors over in shared memory (file
        descriptors passed per batch): 1 worker 7.7k images/s against 5.4k on the benchmark's JPEGs."""
        images = [decode_rgb(self.samples[index][0]) for index in indices]
        heights = np.array([image.shape[1] for image in images])
        widths = np.array([image.shape[2] for image in images])
        draws = uniforms(self.seed, int(self.shared_epoch), indices, 2 * ATTEMPTS + 3)
        boxes = random_resized_boxes(heights, widths, draws)
        flips = (draws[:, FLIP] < 0.5) & self.hflip
        crops = torch.empty(len(indices), 3, self.size, self.size, dtype=torch.uint8)
        for row, (image, (top, left, h, w), flip) in enumerate(zip(images, boxes.tolist(), flips.tolist())):
            # uint8 in, uint8 out: torch's antialiased bilinear kernel has a uint8 path (no float copy)
            crop = torch.nn.functional.interpolate(
                image[None, :, top : top + h, left : left + w],
                size=(self.size, self.size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
            crops[row] = crop.flip(-1) if flip else crop
        labels = torch.tensor([self.samples[index][1] for index in indices], dtype=torch.int64)
        return crops.numpy(), labels.numpy()


def keep_batch(batch):
    """DataLoader's collate for `CroppedBatches`: the batch is one already."""
    return batch
