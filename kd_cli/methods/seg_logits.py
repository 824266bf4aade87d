"""What the segmentation methods share: the teacher's map aligned to the student's, the valid pixels, and
the pixel-wise KD term (pixel_kd's loss, and the `kd_weight` term of feature methods on segmenters)."""

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


def pixel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * mean over `valid` pixels (all when None) of KL(p_t^T || p_s^T); logits (B, C, H, W)."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)  # (B, H, W)
    if valid is not None:
        kl = kl[valid]
    if kl.numel() == 0:
        return student_logits.sum() * 0.0  # every pixel ignored: no signal, and no NaN
    return kl.mean() * temperature**2
