"""`method=cirkd`: cross-image relational distillation (Yang et al., "Cross-Image Relational Knowledge
Distillation for Semantic Segmentation", CVPR 2022), as the authors' code computes it (CIRKD
`losses/cirkd_mini_batch.py` and `losses/cirkd_memory.py`, composed as in `train_cirkd.py`).

On the head's last hidden map of each model (L2-normalised per pixel):
- mini-batch pixel-to-pixel: for every ordered pair of images (i, j) in the batch, each pixel of i has a
  distribution over the pixels of j, softmax(f_i . f_j / T_c); KL(teacher || student), averaged over the
  pixels of i and the B^2 pairs (`minibatch_weight`);
- memory pixel-to-pixel and pixel-to-region: the teacher's pixel embeddings (16 per class and image) and
  region embeddings (the mean over a class's pixels in an image) are queued per class; each labelled
  pixel's similarities to a random sample of each queue, softmax at T_c, are matched by KL at
  T_kd (`memory_pixel_weight`, `memory_region_weight`), the student's map first projected to the
  teacher's width (conv 1x1, BN, ReLU, conv 1x1: learnt with the student).
With pixel-wise KD (`kd_weight`) and the task loss. Defaults: the authors' Cityscapes script (weights
1, 1, 0.1, 0.1; T_c 0.1, T_kd 1; queues of 20000 pixels and 2000 regions per class, 4096 and 1024
contrasted per step). The queues are the method's state (saved for resume): classes x 22000 x teacher
channels floats. One deviation, named in ClassQueues.push. A teacher map of another size is resized to
the student's (bilinear) first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import HeadMapDistiller
from kd_cli.methods.feature_utils import full_precision
from kd_cli.methods.seg_logits import align_to
from kd_cli.registry import NonNegative, PositiveInt, Temperature
from kd_cli.tasks import IGNORE_INDEX

PIXELS_PER_UPDATE = 16  # pixel embeddings a class queues per image (the authors' pixel_update_freq)
MAX_PIXELS = 16384  # positions per map: the mini-batch term holds (positions)^2 similarities per pair


def minibatch_pair_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the B^2 ordered image pairs of KL(softmax(t_i.t_j / T) || softmax(s_i.s_j / T)), each KL
    summed over j's pixels and averaged over i's (maps (B, C, H, W), compared per pixel after L2 norm)."""
    s = F.normalize(student, p=2, dim=1).flatten(2)  # (B, C, N)
    t = F.normalize(teacher, p=2, dim=1).flatten(2)
    total = student.new_zeros(())
    for i in range(len(s)):  # one anchor image at a time: (B, N, N) similarities, not (B, B, N, N)
        log_p_s = F.log_softmax(torch.einsum("cm,bcn->bmn", s[i], s) / temperature, dim=2)
        log_p_t = F.log_softmax(torch.einsum("cm,bcn->bmn", t[i], t) / temperature, dim=2)
        total = total + (log_p_t.exp() * (log_p_t - log_p_s)).sum() / s.shape[2]
    return total / len(s) ** 2


def contrast_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) summed over the contrasted embeddings, averaged over anchors, x T^2."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum() / len(student_logits) * temperature**2


class ClassQueues(nn.Module):
    """Per class, a ring of the teacher's pixel embeddings and one of its region (class-mean) embeddings."""

    pixel_queue: torch.Tensor  # (classes, pixels, channels), unit vectors
    pixel_ptr: torch.Tensor  # (classes,): the next slot of each ring
    region_queue: torch.Tensor
    region_ptr: torch.Tensor

    def __init__(self, classes: int, channels: int, pixels: int, regions: int):
        super().__init__()
        self.register_buffer("pixel_queue", F.normalize(torch.randn(classes, pixels, channels), p=2, dim=2))
        self.register_buffer("pixel_ptr", torch.zeros(classes, dtype=torch.long))
        self.register_buffer("region_queue", F.normalize(torch.randn(classes, regions, channels), p=2, dim=2))
        self.register_buffer("region_ptr", torch.zeros(classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, features: torch.Tensor, masks: torch.Tensor) -> None:
        """Queue each image's class means and up to 16 random pixels of each class. (The authors' code draws
        those pixels' indices among the class's count but indexes the whole image with them, so it queues
        pixels of any class; here they are the class's own, as the paper describes.)"""
        pixels, regions = self.pixel_queue.shape[1], self.region_queue.shape[1]
        for feature, mask in zip(features.flatten(2), masks.flatten(1)):  # (C, N), (N,)
            for label in (int(v) for v in torch.unique(mask) if int(v) != IGNORE_INDEX):
                where = torch.nonzero(mask == label).flatten()
                at = int(self.region_ptr[label])
                self.region_queue[label, at] = F.normalize(feature[:, where].mean(dim=1), p=2, dim=0)
                self.region_ptr[label] = (at + 1) % regions
                order = torch.randperm(len(where))
                count = min(len(where), PIXELS_PER_UPDATE)
                chosen = F.normalize(feature[:, where[order[:count]].to(feature.device)].T, p=2, dim=1)
                at = int(self.pixel_ptr[label])
                if at + count >= pixels:
                    self.pixel_queue[label, -count:] = chosen
                    self.pixel_ptr[label] = 0
                else:
                    self.pixel_queue[label, at : at + count] = chosen
                    self.pixel_ptr[label] = (at + count) % pixels

    @staticmethod
    def sample(queue: torch.Tensor, per_class: int) -> torch.Tensor:
        """The same random `per_class` slots of every class's ring, class after class: (K * per_class, C)."""
        index = torch.randperm(queue.shape[1])[:per_class].to(queue.device)
        return queue[:, index].reshape(-1, queue.shape[2])


@register_method("cirkd")
class CIRKD(HeadMapDistiller):
    loss_weights = ("minibatch_weight", "memory_pixel_weight", "memory_region_weight", "ce_weight", "kd_weight")
    queues: ClassQueues
    project: nn.Sequential

    def __init__(
        self,
        student,
        teacher,
        *,
        minibatch_weight: NonNegative,
        memory_pixel_weight: NonNegative,
        memory_region_weight: NonNegative,
        contrast_temperature: Temperature,
        contrast_kd_temperature: Temperature,
        pixel_memory: PositiveInt,
        region_memory: PositiveInt,
        pixel_contrast: PositiveInt,
        region_contrast: PositiveInt,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        (s_channels, height, width), t_channels = self.student_shapes[0], self.teacher_shapes[0][0]
        if minibatch_weight and height * width > MAX_PIXELS:
            raise KdError(
                f"method=cirkd: {self.student_layers[0]} is {height}x{width}; its pixel-to-pixel similarities "
                f"would be {height * width}^2 per image pair (at most {MAX_PIXELS} positions); tap a coarser layer "
                "(method.student_layers, method.teacher_layers) or set method.minibatch_weight=0"
            )
        classes = int(student.kd_num_classes)
        self.minibatch_weight, self.contrast_temperature = minibatch_weight, contrast_temperature
        self.memory_pixel_weight, self.memory_region_weight = memory_pixel_weight, memory_region_weight
        self.contrast_kd_temperature = contrast_kd_temperature
        # the authors' per-class sample of each queue: the total over the class count, plus one
        self.pixel_per_class = min(pixel_memory, pixel_contrast // classes + 1)
        self.region_per_class = min(region_memory, region_contrast // classes + 1)
        if memory_pixel_weight or memory_region_weight:
            self.project = nn.Sequential(
                nn.Conv2d(s_channels, t_channels, 1, bias=False),
                nn.BatchNorm2d(t_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(t_channels, t_channels, 1, bias=False),
            )
            self.queues = ClassQueues(classes, t_channels, pixel_memory, region_memory)

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        own = self.minibatch_weight or self.memory_pixel_weight or self.memory_region_weight
        logits, student, teacher_logits, teacher = self.features(images, own)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if not own:
            return logits, terms
        s_map, t_map = full_precision(student[0]), full_precision(align_to(teacher[0], student[0]))
        if self.minibatch_weight:
            terms["minibatch"] = self.minibatch_weight * minibatch_pair_loss(s_map, t_map, self.contrast_temperature)
        if self.memory_pixel_weight or self.memory_region_weight:
            pixel, region = self.memory_terms(s_map, t_map, labels)
            if self.memory_pixel_weight:
                terms["memory_pixel"] = self.memory_pixel_weight * pixel
            if self.memory_region_weight:
                terms["memory_region"] = self.memory_region_weight * region
        return logits, terms

    def memory_terms(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel-to-pixel, pixel-to-region) KL of the labelled pixels' similarities to the queues."""
        s = F.normalize(self.project(student), p=2, dim=1)
        t = F.normalize(teacher, p=2, dim=1)
        masks = F.interpolate(labels[:, None].float(), size=s.shape[-2:], mode="nearest")[:, 0].long()
        self.queues.push(t.detach(), masks)  # the normalised embeddings, as the authors queue them
        labelled = (masks != IGNORE_INDEX).flatten()
        if not labelled.any():
            return s.sum() * 0.0, s.sum() * 0.0
        s_pixels = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1])[labelled]
        t_pixels = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])[labelled]
        results = []
        for queue, per_class in (
            (self.queues.pixel_queue, self.pixel_per_class),
            (self.queues.region_queue, self.region_per_class),
        ):
            contrast = ClassQueues.sample(queue, per_class)
            results.append(
                contrast_kd(
                    s_pixels @ contrast.T / self.contrast_temperature,
                    (t_pixels @ contrast.T / self.contrast_temperature).detach(),
                    self.contrast_kd_temperature,
                )
            )
        return results[0], results[1]
