"""What every data set returns, the data-set registry, and `load_dataset`, the one door to them."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from kd_cli.errors import KdError
from kd_cli.registry import Registry

DATASETS = Registry("data set")
register_dataset = DATASETS.register

# Keys of a dataset config node that the framework reads itself; every other key is an option of the
# registered loader function (checked against its signature, so a typo is a one-line error).
COMMON_KEYS = frozenset({"name", "mean", "std", "default_teacher", "default_student", "hflip", "crop_padding"})


@dataclass
class TensorSplit:
    """A split that fits in memory: kept as uint8 so a whole data set sits on the GPU cheaply."""

    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FolderSplit:
    """A split streamed from disk; the loader attaches the transforms."""

    dataset: Dataset  # yields (PIL image, int label)
    image_size: int = 224  # side of the square crops the loader cuts (the data set's input_size)

    def __len__(self) -> int:
        return len(self.dataset)


@dataclass
class DataSplits:
    train: TensorSplit | FolderSplit
    test: TensorSplit | FolderSplit
    num_classes: int
    class_names: list[str]
    in_channels: int
    input_size: int  # side of the (square) images the model sees
    fingerprint: str  # short sha256 identifying the data, recorded in env.json


def load_dataset(cfg: Mapping[str, Any]) -> DataSplits:
    """Load the data set a dataset config node describes (a dict or an OmegaConf DictConfig)."""
    cfg = _plain_dict(cfg)
    if "name" not in cfg:
        raise KdError("the dataset config has no 'name'; choose one with dataset=NAME")
    options = {key: value for key, value in cfg.items() if key not in COMMON_KEYS}
    return DATASETS.build(cfg["name"], {}, options)


def _plain_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # omegaconf comes with hydra; plain dicts work without it
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def absolute(root: str | os.PathLike) -> str:
    """Absolute form of a user path, for messages that must say exactly where we looked."""
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def fingerprint(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")  # separator, so ("ab", "c") and ("a", "bc") differ
    return digest.hexdigest()[:16]


def tensor_split_digest(split: TensorSplit, samples: int = 256) -> list[bytes | str]:
    """Shape, every label, and the bytes of evenly spaced images: cheap, yet changes with the data."""
    step = max(1, len(split) // samples)
    sample = split.images[::step].contiguous()
    return [str(tuple(split.images.shape)), split.labels.numpy().tobytes(), sample.numpy().tobytes()]


def tensor_splits(
    train: TensorSplit, test: TensorSplit, class_names: list[str], *extra: str
) -> DataSplits:
    """DataSplits for in-memory data, with channels, size and fingerprint read off the tensors."""
    for split in (train, test):
        _check_tensor_split(split)
    return DataSplits(
        train=train,
        test=test,
        num_classes=len(class_names),
        class_names=list(class_names),
        in_channels=train.images.shape[1],
        input_size=train.images.shape[-1],
        fingerprint=fingerprint(*tensor_split_digest(train), *tensor_split_digest(test), *class_names, *extra),
    )


def _check_tensor_split(split: TensorSplit) -> None:
    # Catch loader bugs here, where they are cheap to find, not as a shape error deep in training.
    images, labels = split.images, split.labels
    assert images.dtype == torch.uint8 and images.dim() == 4, (images.dtype, images.shape)
    assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],), (labels.dtype, labels.shape)
