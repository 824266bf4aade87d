"""`method=ft`: Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer"
(NeurIPS 2018), as RepDistiller runs it.

A paraphraser (an auto-encoder of three 3x3 convolutions down to `rate` x the channels and three
transposed ones back, LeakyReLU 0.1, no BatchNorm: RepDistiller's `Paraphraser`) learns to reconstruct
the teacher's last feature map (mean squared error) during an initialisation phase of `init_epochs`
epochs, in which that is the only loss (the student is not trained then). Afterwards the paraphraser is
frozen and its encoder gives the teacher's factor; a translator on the student (three 3x3 convolutions
with BatchNorm and LeakyReLU into the factor's channels) gives the student's, and

    ft = mean |factor(student) - factor(teacher)|,   factor(f) = L2-normalised mean over channels of f^2

(RepDistiller's FactorTransfer with p1=2, p2=1; the paper normalises the whole flattened factor instead),
and the paraphraser sees the teacher's map divided by its root mean square per sample (`per_sample_rms`;
RepDistiller feeds it raw, and an untrained or badly calibrated teacher's maps, of magnitude 10-100,
made the auto-encoder diverge within a few SGD steps even at RepDistiller's init learning rate of 0.01),
the larger grid average-pooled to the smaller, weighted by ft_weight beside the CE. The initialisation
epochs are the first `init_epochs` of `trainer.epochs` (see fsp.py for RepDistiller's recipe).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import feature_layers, full_precision, match_spatial
from kd_cli.registry import NonNegative, NonNegativeInt, OpenFraction


def factor(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): the mean over channels of f^2, L2-normalised per sample."""
    return F.normalize(full_precision(features).pow(2).mean(1).flatten(1), dim=1)


def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the factors, the larger grid pooled to the smaller."""
    student_factor, teacher_factor = match_spatial(student_factor, teacher_factor)
    return (factor(student_factor) - factor(teacher_factor)).abs().mean()


def _block(conv: nn.Module, channels: int, batch_norm: bool) -> list[nn.Module]:
    return [conv, *([nn.BatchNorm2d(channels)] if batch_norm else []), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """The teacher-side auto-encoder: its encoder's output is the teacher's factor."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        c, k = channels, factor_channels
        self.encoder = nn.Sequential(
            *_block(nn.Conv2d(c, c, 3, 1, 1), c, False),
            *_block(nn.Conv2d(c, k, 3, 1, 1), k, False),
            *_block(nn.Conv2d(k, k, 3, 1, 1), k, False),
        )
        self.decoder = nn.Sequential(
            *_block(nn.ConvTranspose2d(k, k, 3, 1, 1), k, False),
            *_block(nn.ConvTranspose2d(k, c, 3, 1, 1), c, False),
            *_block(nn.ConvTranspose2d(c, c, 3, 1, 1), c, False),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(features))


def per_sample_rms(features: torch.Tensor) -> torch.Tensor:
    """A map divided by its root mean square per sample: O(1) values whatever the teacher's scale."""
    features = full_precision(features)
    return features / features.pow(2).mean((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)


def translator(channels: int, factor_channels: int) -> nn.Module:
    c, k = channels, factor_channels
    return nn.Sequential(
        *_block(nn.Conv2d(c, c, 3, 1, 1), c, True),
        *_block(nn.Conv2d(c, k, 3, 1, 1), k, True),
        *_block(nn.Conv2d(k, k, 3, 1, 1), k, True),
    )


@register_method("ft")
class FactorTransfer(FeatureDistiller):
    single_layer = True  # the last stage of each model
    loss_weights = ("ft_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        ft_weight: NonNegative,
        rate: OpenFraction,
        init_epochs: NonNegativeInt,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        self.require_maps()
        teacher_channels = self.teacher_shapes[0][0]
        factor_channels = max(1, int(teacher_channels * rate))
        # no modules for a term left out (DDP: every parameter must get a gradient)
        self.paraphraser = Paraphraser(teacher_channels, factor_channels) if ft_weight else None
        self.translator = translator(self.student_shapes[0][0], factor_channels) if ft_weight else None
        self.ft_weight = ft_weight
        self.init_epochs = init_epochs if ft_weight else 0  # no factor to transfer: no paraphraser to train

    def default_layers(self, model: nn.Module) -> list[str]:
        return list(feature_layers(model))[-1:]  # the last stage, before pooling (RepDistiller's feat[-2])

    def start_epoch(self, epoch: int, epochs: int) -> None:
        if self.init_epochs >= epochs:
            raise KdError(
                f"method.init_epochs={self.init_epochs} leaves none of trainer.epochs={epochs} for the "
                f"factor transfer that follows; raise trainer.epochs or lower method.init_epochs"
            )
        super().start_epoch(epoch, epochs)

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        if self.epoch < self.init_epochs:  # the paraphraser learns to reconstruct the teacher's map; nothing else
            _, teacher = self.teacher_features(images)
            with torch.no_grad():
                logits = self.student(images)  # (for the epoch's training accuracy only)
            assert self.paraphraser is not None  # init_epochs > 0 only when ft_weight > 0
            target = per_sample_rms(teacher[0])
            return logits, {"paraphrase": F.mse_loss(full_precision(self.paraphraser(target)), target)}
        logits, student, teacher_logits, teacher = self.features(images, self.ft_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.ft_weight:
            assert self.paraphraser is not None and self.translator is not None  # built when ft_weight > 0
            with torch.no_grad():  # frozen after its phase
                teacher_factor = self.paraphraser.encoder(per_sample_rms(teacher[0]))
            terms["ft"] = self.ft_weight * ft_loss(self.translator(student[0]), teacher_factor)
        return logits, terms
