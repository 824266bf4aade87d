"""A model run over a loader in eval mode: every logit kept (`predict`, for classifiers), or each batch
handed to a task's score (`score`, for any task: a segmentation split's logits never sit in memory)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kd_cli.engine.device import autocast
from kd_cli.tasks import Score


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (float32, CPU) and labels of a loader, in order, with the model in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for images, targets in batches:
        with autocast(device, dtype):
            out = model(images)
        logits.append(out.float())
        labels.append(targets)
    model.train(was_training)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


@torch.no_grad()
def score(model: nn.Module, batches: Iterable, device: torch.device, dtype: torch.dtype, into: Score) -> Score:
    """Feed every batch's outputs and targets to `into` (a task's Score, which takes them in float32); returns it."""
    was_training = model.training
    model.eval()
    for images, targets in batches:
        with autocast(device, dtype):
            out = model(images)
        into.update(out, targets)
    model.train(was_training)
    return into
