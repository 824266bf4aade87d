"""Random images with random labels: no files, any size. For speed and plumbing checks, not accuracy."""

from __future__ import annotations

import torch

from kd_cli.data.base import DataSplits, TensorSplit, register_dataset, tensor_splits
from kd_cli.errors import KdError


@register_dataset("synthetic")
def synthetic(
    root: str | None = None,
    download: bool = False,
    num_train: int = 5000,
    num_test: int = 1000,
    num_classes: int = 10,
    channels: int = 3,
    image_size: int = 32,
    seed: int = 0,
) -> DataSplits:
    """`root` and `download` are accepted, and unused, so every dataset node has the same keys."""
    if min(num_train, num_test, num_classes, channels, image_size) < 1:
        raise KdError("dataset.num_train, num_test, num_classes, channels and image_size must all be >= 1")
    generator = torch.Generator().manual_seed(seed)

    def split(count: int) -> TensorSplit:
        shape = (count, channels, image_size, image_size)
        images = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
        return TensorSplit(images, torch.randint(0, num_classes, (count,), generator=generator))

    train, test = split(num_train), split(num_test)
    return tensor_splits(train, test, [f"class_{i}" for i in range(num_classes)])
