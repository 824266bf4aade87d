"""What a compression step may use besides the model: example input, calibration data, records."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch


@dataclass
class StepContext:
    example: torch.Tensor  # one normalised input (1, C, H, W) on `device`
    calibration_data: Iterable  # un-augmented training batches (images, targets) on `device`
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the task's training loss (Taylor scores)
    transforms: list[dict[str, Any]] = field(default_factory=list)  # records saved in model.json

    def batches(self, count: int):
        """Up to `count` training batches (a fresh pass each call)."""
        return islice(iter(self.calibration_data), count)

    def record(self, **record: Any) -> None:
        self.transforms.append(record)
