"""Batched augmentation of uint8 image tensors on their own device, with per-sample randomness.

Every random draw comes from one `torch.Generator` on the data's device, so a seed reproduces a run,
and every step is a tensor op over the whole batch (no per-sample Python), so a GPU is never starved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd_cli.errors import KdError
from kd_cli.tasks.segmentation import IGNORE_INDEX

# Random erasing draws the erased area and aspect ratio from the ranges torchvision's RandomErasing uses.
ERASE_AREA = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)


@dataclass
class Augmentation:
    crop_padding: int = 0  # random crop after zero padding by this many pixels (0: no crop)
    hflip: bool = False  # horizontal flip with probability 0.5
    rotate_degrees: float = 0.0  # rotation by a uniform angle in [-deg, deg]
    erase_prob: float = 0.0  # probability of erasing (zeroing) one random rectangle
    trivial_augment: bool = False  # TrivialAugmentWide: image-folder data only (it works on single images)

    def __post_init__(self) -> None:
        if self.crop_padding < 0 or self.rotate_degrees < 0 or not 0.0 <= self.erase_prob <= 1.0:
            raise KdError(
                "augmentation: crop_padding and rotate_degrees must be >= 0 and erase_prob in [0, 1] "
                f"(got {self.crop_padding}, {self.rotate_degrees}, {self.erase_prob})"
            )


def augment_batch(x: torch.Tensor, spec: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1], randomly cropped, flipped, rotated and erased per sample."""
    check_in_memory(spec)
    if spec.crop_padding:
        x = random_crop(x, spec.crop_padding, generator)
    x = x.float().div_(255.0)
    if spec.hflip:
        x = random_hflip(x, generator)
    if spec.rotate_degrees:
        x = random_rotate(x, spec.rotate_degrees, generator)
    if spec.erase_prob:
        x = random_erase(x, spec.erase_prob, generator)
    return x


def check_in_memory(spec: Augmentation) -> None:
    """Refuse what batched tensor augmentation cannot do, in one line saying what to change."""
    if spec.trivial_augment:
        raise KdError(
            "augmentation.trivial_augment works on image folders only (dataset=imagefolder); "
            "set augmentation.trivial_augment=false for in-memory data sets"
        )


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel; one value in mean/std applies to every channel."""
    mean_t, std_t = channel_stats(mean, std, x.shape[1], x.device, x.dtype)
    return (x - mean_t) / std_t


def channel_stats(
    mean: Sequence[float], std: Sequence[float], channels: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as (1, C, 1, 1) tensors on `device`; build them once to avoid a copy per batch."""
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise KdError(
            f"dataset.mean/std have {len(mean)}/{len(std)} values but the images have {channels} channel(s); "
            f"give {channels} values each"
        )
    mean_t, std_t = (torch.as_tensor(list(v), dtype=dtype, device=device).view(1, -1, 1, 1) for v in (mean, std))
    return mean_t, std_t


def augment_pair(
    x: torch.Tensor, masks: torch.Tensor, spec: Augmentation, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmentation: uint8 images (B, C, H, W) and masks (B, H, W) moved together (the same crop, flip and
    rotation per sample; the mask by nearest neighbour, what comes in from outside the image ignored);
    erasing is photometric, so it touches the image only. Returns float images in [0, 1] and the masks."""
    check_in_memory(spec)
    if spec.crop_padding:
        dy, dx = crop_offsets(x, spec.crop_padding, generator)
        x = crop_window(x, dy, dx, spec.crop_padding, fill=0)
        masks = crop_window(masks[:, None], dy, dx, spec.crop_padding, fill=IGNORE_INDEX)[:, 0]
    x = x.float().div_(255.0)
    if spec.hflip:
        flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
    if spec.rotate_degrees:
        theta = rotation(x, spec.rotate_degrees, generator)
        x = rotate(x, theta, "bilinear")
        # shifted by one so that the zeros grid_sample brings in from outside become -1, then ignored
        moved = rotate(masks[:, None].float() + 1, theta, "nearest")[:, 0] - 1
        masks = torch.where(moved < 0, IGNORE_INDEX, moved).to(masks.dtype)
    if spec.erase_prob:
        x = random_erase(x, spec.erase_prob, generator)
    return x, masks


def crop_offsets(x: torch.Tensor, padding: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.shape[0]
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    return dy, dx


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding`, then take an H x W window at offsets uniform in [0, 2 * padding]."""
    dy, dx = crop_offsets(x, padding, generator)
    return crop_window(x, dy, dx, padding, fill=0)


def crop_window(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, padding: int, fill: int) -> torch.Tensor:
    """Each sample's H x W window at (dy, dx) of `x` padded by `padding` with `fill`."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding), value=fill)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]  # one gather, broadcast to (B, C, H, W)


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate about the centre by a uniform angle in [-degrees, degrees]; bilinear, corners filled with 0."""
    return rotate(x, rotation(x, degrees, generator), "bilinear")


def rotation(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """A (B, 2, 3) rotation per sample by a uniform angle in [-degrees, degrees]."""
    angle = (torch.rand(x.shape[0], generator=generator, device=x.device) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    # affine_grid works in normalised [-1, 1] coordinates, which is a true rotation for square images.
    return torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)


def rotate(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def random_erase(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """With probability `prob` per sample, zero one rectangle of random area and aspect ratio."""
    b, _, h, w = x.shape
    dev = x.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator, device=dev)

    erase = uniform(0.0, 1.0) < prob
    area = uniform(*ERASE_AREA) * h * w
    ratio = torch.exp(uniform(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])))
    eh = torch.sqrt(area * ratio).round().clamp(1, h)
    ew = torch.sqrt(area / ratio).round().clamp(1, w)
    top = (uniform(0.0, 1.0) * (h - eh + 1)).floor()
    left = (uniform(0.0, 1.0) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=dev)[None, :, None]
    cols = torch.arange(w, device=dev)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < (top + eh)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + ew)[:, None, None])
    )
    return x.masked_fill((inside & erase[:, None, None])[:, None], 0.0)
