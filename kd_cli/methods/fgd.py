"""`method=fgd`: focal and global distillation (Yang et al., "Focal and Global Knowledge Distillation for
Detectors", CVPR 2022), on the FPN levels.

Per level (the student's map through a 1x1 conv to the teacher's channels where they differ):
- focal: the ground-truth boxes, scaled to the level, mark the foreground (each cell weighted 1 / the
  cells of the smallest box covering it) and the background (the other cells, weights summing to 1);
  the teacher's spatial attention (H*W * softmax over cells of the channel-mean |map| / temp) and channel
  attention (C * softmax over channels of the cell-mean |map| / temp) weight the squared differences,
  summed, per image: `alpha_fgd` * foreground + `beta_fgd` * background;
- attention: `gamma_fgd` * the L1 distance between the student's and the teacher's attentions, per image;
- global: a GcBlock per model (a softmax-pooled context, 1x1 conv, LayerNorm, ReLU, 1x1 conv, added to the
  map) and `lambda_fgd` * their summed squared difference per image.
Summed over levels. The formulas and defaults (temp 0.5, 0.001, 0.0005, 0.001, 5e-6) are the authors' loss
as mmrazor's `FGDLoss` has it (the foreground mask indexed rows by y and columns by x; the authors' own
file indexes them the other way round, which differs on maps that are not square). The boxes are scaled
by the size of the backbone's input (the batch as padded), where mmrazor scales by the unpadded image.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.methods import register_method
from kd_cli.methods.fpn_base import FpnDistiller, Levels, connectors
from kd_cli.registry import NonNegative, Positive, Temperature


def attention(maps: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(spatial (N, H, W), channel (N, C)) attention of (N, C, H, W) maps."""
    n, c, h, w = maps.shape
    value = maps.abs()
    spatial = h * w * F.softmax((value.mean(1) / temp).reshape(n, -1), dim=1)
    channel = c * F.softmax(value.mean((2, 3)) / temp, dim=1)
    return spatial.reshape(n, h, w), channel


def box_masks(
    boxes: list[torch.Tensor], level: tuple[int, int], image: tuple[int, int], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground, background) masks (N, H, W) of a level of size `level` for boxes in pixels of `image`."""
    (h, w), (image_h, image_w) = level, image
    foreground = torch.zeros(len(boxes), h, w, dtype=dtype, device=boxes[0].device if boxes else None)
    background = torch.ones_like(foreground)
    for i, image_boxes in enumerate(boxes):
        factors = torch.tensor([w / image_w, h / image_h] * 2, dtype=dtype, device=image_boxes.device)
        scaled = image_boxes.detach().to(dtype) * factors
        x1, x2 = scaled[:, 0].floor().int().tolist(), scaled[:, 2].ceil().int().tolist()
        y1, y2 = scaled[:, 1].floor().int().tolist(), scaled[:, 3].ceil().int().tolist()
        for left, right, top, bottom in zip(x1, x2, y1, y2):
            weight = 1.0 / ((bottom + 1 - top) * (right + 1 - left))
            cells = foreground[i, top : bottom + 1, left : right + 1]
            foreground[i, top : bottom + 1, left : right + 1] = cells.clamp(min=weight)
        background[i] = (foreground[i] <= 0).to(dtype)
        if background[i].sum():
            background[i] /= background[i].sum()
    return foreground, background


def focal_losses(
    student: torch.Tensor, teacher: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor, temp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground, background) feature losses: squared differences weighted by the teacher's attentions and
    the masks, summed, over the batch size."""
    spatial, channel = attention(teacher, temp)
    weight = (spatial[:, None] * channel[:, :, None, None]).sqrt()
    n = len(student)
    difference = (student - teacher) * weight
    fg = (difference * foreground[:, None].sqrt()).pow(2).sum() / n
    bg = (difference * background[:, None].sqrt()).pow(2).sum() / n
    return fg, bg


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """L1 distance between the two models' channel and spatial attentions, over the batch size."""
    spatial_s, channel_s = attention(student, temp)
    spatial_t, channel_t = attention(teacher, temp)
    n = len(student)
    return (channel_s - channel_t).abs().sum() / n + (spatial_s - spatial_t).abs().sum() / n


class GcBlock(nn.Module):
    """The global context block of FGD's relation loss: the map plus a transform of its attention-pooled context."""

    def __init__(self, channels: int):
        super().__init__()
        self.mask = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, 1),
        )
        nn.init.kaiming_normal_(self.mask.weight, mode="fan_in", nonlinearity="relu")
        last = self.transform[-1]
        assert isinstance(last, nn.Conv2d) and self.mask.bias is not None and last.bias is not None
        nn.init.zeros_(self.mask.bias)
        nn.init.zeros_(last.weight)  # the block starts as the identity (the authors' init)
        nn.init.zeros_(last.bias)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        n, c = maps.shape[:2]
        weights = F.softmax(self.mask(maps).reshape(n, 1, -1), dim=2)  # (N, 1, HW)
        context = torch.bmm(maps.reshape(n, c, -1), weights.transpose(1, 2)).reshape(n, c, 1, 1)
        return maps + self.transform(context)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, block_s: nn.Module, block_t: nn.Module) -> torch.Tensor:
    return (block_s(student) - block_t(teacher)).pow(2).sum() / len(student)


@register_method("fgd")
class FGD(FpnDistiller):
    loss_weights = ("alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd")

    def __init__(
        self,
        student,
        teacher,
        *,
        temp: Temperature,
        alpha_fgd: NonNegative,
        beta_fgd: NonNegative,
        gamma_fgd: NonNegative,
        lambda_fgd: NonNegative,
        det_loss_scale: Positive,
    ):
        super().__init__(student, teacher, det_loss_scale=det_loss_scale)
        self.temp = temp
        self.alpha, self.beta, self.gamma, self.lambda_ = alpha_fgd, beta_fgd, gamma_fgd, lambda_fgd
        self.align = connectors(self.student_channels, self.teacher_channels)
        if lambda_fgd:  # (a term weighted 0 builds nothing: every parameter takes part in the loss)
            self.blocks_s = nn.ModuleList(GcBlock(c) for c in self.teacher_channels)
            self.blocks_t = nn.ModuleList(GcBlock(c) for c in self.teacher_channels)

    def level_terms(self, student: Levels, teacher: Levels, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        image = self.backbone_input_size
        boxes = [t["boxes"] for t in targets]
        terms: dict[str, list[torch.Tensor]] = {"fgd_fg": [], "fgd_bg": [], "fgd_attention": [], "fgd_global": []}
        for k, (align, s, t) in enumerate(zip(self.align, student, teacher)):
            s, t = align(s).float(), t.float()
            if self.alpha or self.beta:
                foreground, background = box_masks(boxes, (t.shape[-2], t.shape[-1]), image, t.dtype)
                fg, bg = focal_losses(s, t, foreground, background, self.temp)
                terms["fgd_fg"].append(self.alpha * fg)
                terms["fgd_bg"].append(self.beta * bg)
            if self.gamma:
                terms["fgd_attention"].append(self.gamma * attention_loss(s, t, self.temp))
            if self.lambda_:
                terms["fgd_global"].append(self.lambda_ * relation_loss(s, t, self.blocks_s[k], self.blocks_t[k]))
        weights = {"fgd_fg": self.alpha, "fgd_bg": self.beta, "fgd_attention": self.gamma, "fgd_global": self.lambda_}
        return {name: torch.stack(values).sum() for name, values in terms.items() if values and weights[name]}
