"""Random images with random labels: no files, any size. For speed and plumbing checks, not accuracy.

Each class gets the same number of images (up to one), in a random order, so a split holds every class
once it has as many images as there are classes. Safety audit: nothing is read from disk.
"""

from __future__ import annotations

from typing import Annotated

import torch

from kd_cli.data.base import (
    ClassCount,
    DataSplits,
    TensorSplit,
    TorchSeed,
    register_dataset,
    tensor_splits,
)
from kd_cli.errors import KdError
from kd_cli.registry import Range

MAX_BYTES = 8 * 2**30


@register_dataset("synthetic")
def synthetic(
    root: str | None = None,
    download: bool = False,
    num_train: Annotated[int, Range(1, 10_000_000)] = 5000,
    num_test: Annotated[int, Range(1, 10_000_000)] = 1000,
    num_classes: ClassCount = 10,
    channels: Annotated[int, Range(1, 16)] = 3,
    image_size: Annotated[int, Range(1, 1024)] = 32,
    seed: TorchSeed = 0,
) -> DataSplits:
    """`root` and `download` are accepted, and unused, so every dataset node has the same keys."""
    generator = torch.Generator().manual_seed(seed)

    def split(count: int) -> TensorSplit:
        shape = (count, channels, image_size, image_size)
        images = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
        labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=generator)]
        return TensorSplit(images, labels)

    train, test = split(num_train), split(num_test)
    return tensor_splits(train, test, [f"class_{i}" for i in range(num_classes)])


def _fits_in_memory(num_train: int, num_test: int, channels: int, image_size: int, **_: object) -> None:
    size = (num_train + num_test) * channels * image_size**2
    if size > MAX_BYTES:
        raise KdError(
            f"the synthetic data set would hold {size / 2**30:.1f} GiB of images (num_train + num_test, "
            f"channels, image_size); keep it under {MAX_BYTES // 2**30} GiB"
        )


synthetic.validate_options = _fits_in_memory  # type: ignore[attr-defined]  # a function attribute
synthetic.image_channels = lambda options: options["channels"]  # type: ignore[attr-defined]  # a function attribute
