"""MNIST, Fashion-MNIST, CIFAR-10/100 and SVHN through torchvision's own classes.

torchvision reads (and, when asked, downloads and checks) the real files; we then take its `.data` and
`.targets` arrays straight into uint8 NCHW tensors, which is far faster than iterating PIL images. What
torchvision returns is checked (dtype, shape, one label per image) so that a wrong file is a one-line
"look corrupt" error, not a failed assertion later.

Safety audit (nothing here runs code from a data file):
- CIFAR-10/100: torchvision unpickles the batches and the meta file. kd's subclass runs torchvision's
  own `__init__`/`_load_meta` code with `pickle` bound to a restricted unpickler (`safe_pickle`), which
  allows only the numpy globals such files contain, with or without `verify_checksums`. A crafted file
  is refused in one line naming it; its payload is never looked up, let alone called.
- MNIST, Fashion-MNIST: the raw IDX files are parsed as bytes (`torch.frombuffer`). The legacy
  processed/*.pt files that old torchvision versions wrote are read with `torch.load(weights_only=True)`
  (torch's restricted unpickler: tensors and plain containers only; an explicit True is not overridden by
  TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD); kd forces this even on the torchvision versions that did not pass it.
- SVHN: scipy.io.loadmat parses MATLAB v4/v5 files as data (MATLAB objects and function handles come back
  as inert records; v7.3/HDF5 files are refused by scipy).
- Downloads (`download=true` only): the archives' md5 is always checked by torchvision before extraction,
  `verify_checksums=false` included (it relaxes the extracted files' md5s only).
"""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import torch
from torchvision import datasets as tv

from kd_cli.data.base import (
    DataSplits,
    TensorSplit,
    absolute,
    register_dataset,
    tensor_splits,
)
from kd_cli.data.on_disk import open_or_explain
from kd_cli.data.safe_pickle import reading_with
from kd_cli.errors import KdError


@register_dataset("mnist")
def mnist(root: str = "data", download: bool = False) -> DataSplits:
    return _mnist_style(tv.MNIST, "MNIST", root, download)


@register_dataset("fashion_mnist")
def fashion_mnist(root: str = "data", download: bool = False) -> DataSplits:
    return _mnist_style(tv.FashionMNIST, "Fashion-MNIST", root, download)


@register_dataset("cifar10")
def cifar10(root: str = "data", download: bool = False, verify_checksums: bool = True) -> DataSplits:
    return _cifar(_safe_cifar(_checked(tv.CIFAR10, verify_checksums)), "CIFAR-10", root, download)


@register_dataset("cifar100")
def cifar100(root: str = "data", download: bool = False, verify_checksums: bool = True) -> DataSplits:
    return _cifar(_safe_cifar(_checked(tv.CIFAR100, verify_checksums)), "CIFAR-100", root, download)


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


def _safe_cifar(cls: type[tv.CIFAR10]) -> type[tv.CIFAR10]:
    """`cls` with torchvision's own reading code (`__init__`, `_load_meta`) re-bound to the restricted
    unpickler. Built per load, from the class as it is then (tests swap its md5 tables)."""
    methods = {name: reading_with(getattr(tv.CIFAR10, name)) for name in ("__init__", "_load_meta")}
    return type(cls.__name__, (cls,), methods)


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
        "SVHN",
        root,
        " and ".join(names),
        [os.path.join(root, name) for name in names],
        download,
        lambda: (svhn_cls(root, split="train", download=download), svhn_cls(root, split="test", download=download)),
    )
    # torchvision already transposed SVHN to (N, C, H, W) and mapped label 10 to digit 0.
    splits = [_split("SVHN", root, ds.data, ds.labels, (3, 32, 32)) for ds in (train, test)]
    return tensor_splits(splits[0], splits[1], [str(digit) for digit in range(10)])


def _mnist_style(cls: type[tv.MNIST], title: str, root: str, download: bool) -> DataSplits:
    root = absolute(root)
    raw = os.path.join(root, cls.__name__, "raw")
    names = [os.path.splitext(os.path.basename(resource[0]))[0] for resource in cls.resources]
    files = [os.path.join(raw, name) for name in names]
    if _has_legacy_files(cls, root):
        files = []  # torchvision still reads the processed/*.pt files old versions wrote
    expected = f"{cls.__name__}/raw/{names[0]} and the other {len(names) - 1} unzipped IDX files"
    safe = type(cls.__name__, (cls,), {"_load_legacy_data": _load_legacy_data})  # same name: same folders
    train, test = open_or_explain(
        title,
        root,
        expected,
        files,
        download,
        lambda: (safe(root, train=True, download=download), safe(root, train=False, download=download)),
    )
    splits = [_split(title, root, _numpy(ds.data)[:, None], _numpy(ds.targets), (1, 28, 28)) for ds in (train, test)]
    return tensor_splits(splits[0], splits[1], list(train.classes))


def _load_legacy_data(self: tv.MNIST):
    """torchvision's reader of the processed/*.pt files, with weights_only=True whatever its version."""
    path = os.path.join(self.processed_folder, self.training_file if self.train else self.test_file)
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        problem = (
            f"asks to run {named.group(1)} when read, which a data file of this kind never does; kd did not run it"
            if named
            else "is not a plain tensor file (torch.load refused it with weights_only=True)"
        )
        raise KdError(
            f"{path} {problem}. Delete {self.processed_folder} so that the raw IDX files are read instead"
        ) from None


def _has_legacy_files(cls: type[tv.MNIST], root: str) -> bool:
    processed = os.path.join(root, cls.__name__, "processed")
    return all(os.path.isfile(os.path.join(processed, name)) for name in (cls.training_file, cls.test_file))


def _cifar(cls: type[tv.CIFAR10], title: str, root: str, download: bool) -> DataSplits:
    root = absolute(root)
    names = [name for name, _md5 in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    files = [os.path.join(root, cls.base_folder, name) for name in names]
    train, test = open_or_explain(
        title,
        root,
        f"{cls.base_folder}/",
        files,
        download,
        lambda: (cls(root, train=True, download=download), cls(root, train=False, download=download)),
    )
    # torchvision made the images NHWC; back to NCHW.
    splits = [
        _split(title, root, np.asarray(ds.data).transpose(0, 3, 1, 2), ds.targets, (3, 32, 32)) for ds in (train, test)
    ]
    classes = list(train.classes)
    if not all(isinstance(name, str) for name in classes):
        raise KdError(
            f"{title} files under {root} look corrupt (class names are not strings); delete them and "
            "download again (dataset.download=true)"
        )
    return tensor_splits(splits[0], splits[1], classes)


def _numpy(value) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _split(title: str, root: str, images, labels, shape: tuple[int, int, int]) -> TensorSplit:
    """A TensorSplit from what torchvision read, or a one-line error when it is not uint8 images of
    `shape` with one whole-number label each."""
    images = np.asarray(images)
    try:
        labels = np.asarray(labels).reshape(-1)
        whole = labels.dtype.kind in "iu" or (labels.dtype.kind == "f" and bool(np.all(labels == np.round(labels))))
    except (TypeError, ValueError):
        whole = False
    problem = None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape:
        problem = f"images are {images.dtype} {tuple(images.shape[1:])}, expected uint8 {shape}"
    elif not whole or len(labels) != len(images):
        problem = f"{len(images)} images but {labels.size} labels, or labels that are not whole numbers"
    if problem:
        raise KdError(
            f"{title} files under {root} look corrupt ({problem}); delete them and download again "
            "(dataset.download=true) or replace them"
        )
    return TensorSplit(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


for _loader, _channels in ((mnist, 1), (fashion_mnist, 1), (cifar10, 3), (cifar100, 3), (svhn, 3)):
    _loader.image_channels = _channels  # type: ignore[attr-defined]  # a function attribute (base.expected_channels)
