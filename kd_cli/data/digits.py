"""scikit-learn's digits: 1,797 real 8x8 handwritten digits shipped inside scikit-learn (no download).

It is the default data set so that `kd distill` works on a fresh, offline machine.
"""

from __future__ import annotations

import numpy as np
import torch

from kd_cli.data.base import DataSplits, TensorSplit, register_dataset, tensor_splits
from kd_cli.errors import KdError


@register_dataset("digits")
def digits(
    root: str | None = None, download: bool = False, test_fraction: float = 0.3, split_seed: int = 0
) -> DataSplits:
    """`root` and `download` are accepted, and unused, so every dataset node has the same keys."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise KdError(f"dataset.test_fraction must be between 0 and 1, got {test_fraction}")
    bunch = load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); stretch them to the uint8 range.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    # No official split: a stratified one keeps every class's share equal in train and test.
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=split_seed
    )
    splits = [TensorSplit(torch.from_numpy(images[i]), torch.from_numpy(labels[i])) for i in (train_idx, test_idx)]
    return tensor_splits(*splits, [str(name) for name in bunch.target_names])
