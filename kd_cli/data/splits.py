"""Loading a data set: its config node checked, the registered loader run, a validation split held out
when asked, the splits checked (the one entry point: `kd_cli.data.load_dataset`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from kd_cli.data.base import (
    DATASETS,
    BoxSplit,
    DataSplits,
    FolderSplit,
    TensorSplit,
    check_dataset_config,
    dataset_options,
    fingerprint,
    plain_dict,
    split_labels,
)
from kd_cli.data.checks import check_splits
from kd_cli.errors import KdError


def load_dataset(cfg: Mapping[str, Any]) -> DataSplits:
    """Load the data set a dataset config node describes (a dict or an OmegaConf DictConfig).

    The node is checked first (`check_dataset_config`), the loaded splits after (`check_splits`):
    a degenerate data set is refused, a test split that leaks training images is reported."""
    cfg = plain_dict(cfg)
    check_dataset_config(cfg)
    data = DATASETS.build(cfg["name"], {}, dataset_options(cfg))
    fraction = cfg.get("val_fraction") or 0.0
    if fraction and data.val is None:
        data = hold_out_validation(data, fraction, cfg.get("split_seed", 0), cfg["name"])
    check_splits(data, cfg["name"])
    return data


def hold_out_validation(data: DataSplits, fraction: float, seed: int, name: str) -> DataSplits:
    """Move `fraction` of each training class (at least one image of any class that has two, never its
    last) into a validation split, drawn with `seed`.

    The fingerprint changes with it: a teacher found by fingerprint was trained on the same, smaller,
    training split, so it has never seen a validation image either."""
    known = split_labels(data.train)
    # (images without one label, segmentation's masks and detection's boxes, are held out as one group)
    if known is not None and known.dim() == 1 and len(known) == len(data.train):
        labels = known.numpy()
    else:
        labels = np.zeros(len(data.train), dtype=np.int64)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.append(members[:count])
    val_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    if len(val_idx) == 0:
        raise KdError(
            f"dataset={name}: dataset.val_fraction={fraction} holds out no image (every class has a single "
            "training image); add images, or set dataset.val_fraction=0"
        )
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    train, val = (subset(data.train, idx.tolist()) for idx in (train_idx, val_idx))
    return replace(
        data,
        train=train,
        val=val,
        fingerprint=fingerprint(data.fingerprint, f"val_fraction={fraction}", f"seed={seed}"),
    )


def subset(split: TensorSplit | FolderSplit | BoxSplit, indices: list[int]) -> TensorSplit | FolderSplit | BoxSplit:
    """The samples of `split` at `indices`, of the same kind."""
    if isinstance(split, BoxSplit):

        def pick(values):
            return None if values is None else [values[i] for i in indices]

        return BoxSplit(
            split.images[torch.as_tensor(indices, dtype=torch.int64)],
            [split.boxes[i] for i in indices],
            [split.labels[i] for i in indices],
            [split.image_ids[i] for i in indices],
            pick(split.scales),
            pick(split.sizes),
            pick(split.crowds),
        )
    if isinstance(split, TensorSplit):
        index = torch.as_tensor(indices, dtype=torch.int64)
        return TensorSplit(split.images[index], split.labels[index])
    return FolderSplit(Subset(split.dataset, indices), split.image_size, split.crop_fraction, split.task)
