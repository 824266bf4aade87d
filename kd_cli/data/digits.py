"""scikit-learn's digits: 1,797 real 8x8 handwritten digits shipped inside scikit-learn (no download).

It is the default data set so that `kd distill` works on a fresh, offline machine.

Safety audit: scikit-learn reads its bundled digits.csv.gz with numpy's text reader; no code, no pickle.
No two of the 1,797 images are identical, so no split of them has a test image that is also a training
image.
"""

from __future__ import annotations

import numpy as np
import torch

from kd_cli.data.base import (
    DataSplits,
    SplitSeed,
    TensorSplit,
    register_dataset,
    tensor_splits,
)
from kd_cli.data.on_disk import brief
from kd_cli.errors import KdError
from kd_cli.registry import OpenFraction


@register_dataset("digits")
def digits(
    root: str | None = None, download: bool = False, test_fraction: OpenFraction = 0.3, split_seed: SplitSeed = 0
) -> DataSplits:
    """`root` and `download` are accepted, and unused, so every dataset node has the same keys."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); stretch them to the uint8 range.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    # No official split: a stratified one keeps every class's share equal in train and test.
    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=split_seed
        )
    except ValueError as error:  # a split too small to hold every class once
        raise KdError(
            f"dataset.test_fraction={test_fraction} cannot split the {len(labels)} digits so that both "
            f"splits hold all 10 classes ({brief(error)}); choose a value nearer 0.3"
        ) from None
    splits = [TensorSplit(torch.from_numpy(images[i]), torch.from_numpy(labels[i])) for i in (train_idx, test_idx)]
    return tensor_splits(splits[0], splits[1], [str(name) for name in bunch.target_names])


digits.image_channels = 1  # type: ignore[attr-defined]  # a function attribute, read by base.expected_channels
