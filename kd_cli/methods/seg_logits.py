"""What the segmentation methods share: the teacher's map aligned to the student's, and the valid pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_cli.tasks import IGNORE_INDEX


def align_to(maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps resized to `like`'s spatial size (bilinear) where they differ: a teacher at
    another output stride is compared with the student at the student's resolution."""
    if maps.shape[-2:] == like.shape[-2:]:
        return maps
    return F.interpolate(maps, size=like.shape[-2:], mode="bilinear", align_corners=False)


def valid_pixels(masks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, h, w) bool: the pixels of `like`'s size whose label is not ignored (masks resized by nearest)."""
    if masks.shape[-2:] != like.shape[-2:]:
        masks = F.interpolate(masks[:, None].float(), size=like.shape[-2:], mode="nearest")[:, 0]
    return masks != IGNORE_INDEX
