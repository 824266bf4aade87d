"""scikit-learn's digits: 1,797 real 8x8 handwritten digits shipped inside scikit-learn (no download).

It is the default data set so that `kd distill` works on a fresh, offline machine.

Safety audit: scikit-learn reads its bundled digits.csv.gz with numpy's text reader; no code, no pickle.
No two of the 1,797 images are identical, so no split of them has a test image that is also a training
image.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

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

# The default split (test_fraction=0.3, split_seed=0), as scikit-learn's stratified `train_test_split`
# draws it, stored beside this file: every `kd` command on the default data then starts without importing
# scikit-learn and SciPy (a second of a two-second start-up). tests/test_data.py checks it equals the draw.
DEFAULT_SPLIT = Path(__file__).with_name("digits_default_split.npz")


@register_dataset("digits")
def digits(
    root: str | None = None, download: bool = False, test_fraction: OpenFraction = 0.3, split_seed: SplitSeed = 0
) -> DataSplits:
    """`root` and `download` are accepted, and unused, so every dataset node has the same keys."""
    pixels, labels = digits_arrays()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); stretch them to the uint8 range.
    images = np.rint(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[:, None]
    train_idx, test_idx = stratified_split(labels, test_fraction, split_seed)
    splits = [TensorSplit(torch.from_numpy(images[i]), torch.from_numpy(labels[i])) for i in (train_idx, test_idx)]
    return tensor_splits(splits[0], splits[1], [str(name) for name in range(10)])


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels 1797 x 64 as float, labels 1797) read from the digits.csv.gz inside scikit-learn's package,
    found without importing scikit-learn; through `load_digits` where that file is not where it was."""
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec else []
    csv = [Path(folder) / "datasets" / "data" / "digits.csv.gz" for folder in folders]
    if csv and csv[0].is_file():
        table = np.loadtxt(csv[0], delimiter=",")
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target.astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): no official split, so a stratified one keeps every class's share
    equal in train and test (scikit-learn's draw; the default one read from the stored file)."""
    if (test_fraction, split_seed) == (0.3, 0) and DEFAULT_SPLIT.is_file():
        with np.load(DEFAULT_SPLIT, allow_pickle=False) as stored:
            return stored["train"].astype(np.int64), stored["test"].astype(np.int64)
    from sklearn.model_selection import train_test_split

    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=split_seed
        )
    except ValueError as error:  # a split too small to hold every class once
        raise KdError(
            f"dataset.test_fraction={test_fraction} cannot split the {len(labels)} digits so that both "
            f"splits hold all 10 classes ({brief(error)}); choose a value nearer 0.3"
        ) from None
    return train_idx, test_idx


digits.image_channels = 1  # type: ignore[attr-defined]  # a function attribute, read by base.expected_channels
