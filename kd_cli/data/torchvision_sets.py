"""MNIST, Fashion-MNIST, CIFAR-10/100 and SVHN through torchvision's own classes.

torchvision reads (and, when asked, downloads and checks) the real files; we then take its `.data` and
`.targets` arrays straight into uint8 NCHW tensors, which is far faster than iterating PIL images.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torchvision import datasets as tv

from kd_cli.data.base import DataSplits, TensorSplit, absolute, register_dataset, tensor_splits
from kd_cli.data.files import open_or_explain
from kd_cli.errors import KdError


@register_dataset("mnist")
def mnist(root: str = "data", download: bool = False) -> DataSplits:
    return _mnist_style(tv.MNIST, "MNIST", root, download)


@register_dataset("fashion_mnist")
def fashion_mnist(root: str = "data", download: bool = False) -> DataSplits:
    return _mnist_style(tv.FashionMNIST, "Fashion-MNIST", root, download)


@register_dataset("cifar10")
def cifar10(root: str = "data", download: bool = False, verify_checksums: bool = True) -> DataSplits:
    return _cifar(_checked(tv.CIFAR10, verify_checksums), "CIFAR-10", root, download)


@register_dataset("cifar100")
def cifar100(root: str = "data", download: bool = False, verify_checksums: bool = True) -> DataSplits:
    return _cifar(_checked(tv.CIFAR100, verify_checksums), "CIFAR-100", root, download)


def _checked(cls: type, verify_checksums: bool) -> type:
    """torchvision checks the md5 of the official files. `verify_checksums=false` keeps its reading
    code but with no md5 to compare (torchvision then checks only that each file exists), for
    re-packed copies in the same format (a subset, a converted mirror)."""
    if verify_checksums:
        return cls
    unchecked: dict = {}
    for table in ("train_list", "test_list"):
        if hasattr(cls, table):
            unchecked[table] = [[name, None] for name, _md5 in getattr(cls, table)]
    if hasattr(cls, "meta"):
        unchecked["meta"] = {**cls.meta, "md5": None}
    if hasattr(cls, "split_list"):
        unchecked["split_list"] = {split: [url, name, None] for split, (url, name, _md5) in cls.split_list.items()}
    return type(cls.__name__, (cls,), unchecked)


@register_dataset("svhn")
def svhn(root: str = "data/svhn", download: bool = False, verify_checksums: bool = True) -> DataSplits:
    """SVHN's train and test splits ('extra' is not used). torchvision keeps its .mat files right in `root`."""
    try:
        import scipy.io  # noqa: F401  (torchvision needs it to read .mat files)
    except ImportError:
        raise KdError("SVHN needs scipy to read its .mat files; install it with `pip install scipy`") from None
    svhn_cls = _checked(tv.SVHN, verify_checksums)
    root = absolute(root)
    names = [tv.SVHN.split_list[split][1] for split in ("train", "test")]
    train, test = open_or_explain(
        "SVHN", root, " and ".join(names), [os.path.join(root, name) for name in names], download,
        lambda: (svhn_cls(root, split="train", download=download), svhn_cls(root, split="test", download=download)),
    )
    # torchvision already transposed SVHN to (N, C, H, W) and mapped label 10 to digit 0.
    splits = [TensorSplit(torch.from_numpy(np.ascontiguousarray(ds.data)), torch.from_numpy(ds.labels).long())
              for ds in (train, test)]
    return tensor_splits(*splits, [str(digit) for digit in range(10)])


def _mnist_style(cls: type[tv.MNIST], title: str, root: str, download: bool) -> DataSplits:
    root = absolute(root)
    raw = os.path.join(root, cls.__name__, "raw")
    names = [os.path.splitext(os.path.basename(resource[0]))[0] for resource in cls.resources]
    files = [os.path.join(raw, name) for name in names]
    if _has_legacy_files(cls, root):
        files = []  # torchvision still reads the processed/*.pt files old versions wrote
    expected = f"{cls.__name__}/raw/{names[0]} and the other {len(names) - 1} unzipped IDX files"
    train, test = open_or_explain(
        title, root, expected, files, download,
        lambda: (cls(root, train=True, download=download), cls(root, train=False, download=download)),
    )
    splits = [TensorSplit(ds.data.unsqueeze(1).contiguous(), ds.targets.long()) for ds in (train, test)]
    return tensor_splits(*splits, list(train.classes))


def _has_legacy_files(cls: type[tv.MNIST], root: str) -> bool:
    processed = os.path.join(root, cls.__name__, "processed")
    return all(os.path.isfile(os.path.join(processed, name)) for name in (cls.training_file, cls.test_file))


def _cifar(cls: type[tv.CIFAR10], title: str, root: str, download: bool) -> DataSplits:
    root = absolute(root)
    names = [name for name, _md5 in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    files = [os.path.join(root, cls.base_folder, name) for name in names]
    train, test = open_or_explain(
        title, root, f"{cls.base_folder}/", files, download,
        lambda: (cls(root, train=True, download=download), cls(root, train=False, download=download)),
    )
    splits = [
        TensorSplit(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),  # NHWC -> NCHW
                    torch.as_tensor(ds.targets, dtype=torch.int64))
        for ds in (train, test)
    ]
    return tensor_splits(*splits, list(train.classes))
