"""Data: the data-set registry, in-memory tensor splits, batched on-device augmentation, loaders.

Importing this package registers every data set: each module here that defines one does so with
`@register_dataset`. `check_dataset_config` checks a dataset config node without loading anything;
`load_dataset` checks it too, loads, and checks the splits.
"""

from kd_cli.data.augment import Augmentation
from kd_cli.data.base import (
    COMMON_KEYS,
    DATASETS,
    BoxSplit,
    DataSplits,
    FolderSplit,
    TensorSplit,
    check_dataset_config,
    dataset_task,
    register_dataset,
)
from kd_cli.data.loader import make_loader
from kd_cli.data.splits import load_dataset
from kd_cli.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = [
    "DATASETS",
    "register_dataset",
    "load_dataset",
    "check_dataset_config",
    "dataset_task",
    "DataSplits",
    "TensorSplit",
    "BoxSplit",
    "FolderSplit",
    "Augmentation",
    "make_loader",
    "COMMON_KEYS",
]
