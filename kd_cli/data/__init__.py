"""Data: the data-set registry, in-memory tensor splits, batched on-device augmentation, loaders.

Importing this package registers every built-in data set. `check_dataset_config` checks a dataset
config node without loading anything; `load_dataset` checks it too, loads, and checks the splits.
"""

from kd_cli.data.augment import AugmentSpec
from kd_cli.data.base import (COMMON_KEYS, DATASETS, DataSplits, FolderSplit, TensorSplit, check_dataset_config,
                              register_dataset)
from kd_cli.data.load import load_dataset
from kd_cli.data.loader import make_loader
from kd_cli.data import digits, folder, synthetic, torchvision_sets  # noqa: F401  (register the data sets)

__all__ = [
    "DATASETS", "register_dataset", "load_dataset", "check_dataset_config", "DataSplits", "TensorSplit",
    "FolderSplit", "AugmentSpec", "make_loader", "COMMON_KEYS",
]
