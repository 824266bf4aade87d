"""Checks every loaded data set goes through (`load_dataset` runs them after the loader returns).

Refused, in one line that says what to change: an empty training or test split; fewer than two classes
(a one-class "classifier" scores 100 % and means nothing); a label outside the class list; a training
split without a class the test split has (the model could never predict it).
Reported with `warn` and the run goes on: a test split without some classes (their accuracy is not
measured); test images that are exact copies of training images (test accuracy then overstates
generalisation).

Duplicates: in-memory splits hash each image (a 64-bit multiply-sum over its bytes, one integer dot
product per block of images) and compare the bytes of the hash matches, so a reported copy is always
an exact copy; image folders compare file sizes first, then a BLAKE2b of the first 4 KiB of the files
whose size occurs on both sides, then of the whole of those whose heads match too (no image is decoded).
A data set whose labels are unknown without decoding its images (a generic Dataset) skips the class
checks.

Measured on random uint8 tensors (2 loaded cores): 70k x 1x28x28 (MNIST-size) ~30-40 ms for every check
here, 60k x 3x32x32 (CIFAR-size) ~40-55 ms, 99k x 3x32x32 (SVHN-size) ~50-75 ms.

scikit-learn's digits (the default data set) holds no two identical images at all (1,797 distinct), so
any duplicate found is worth a warning: there is no threshold.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kd_cli.data.base import (
    BoxSplit,
    DataSplits,
    FolderSplit,
    TensorSplit,
    folder_samples,
    split_labels,
)
from kd_cli.errors import KdError, warn
from kd_cli.tasks.segmentation import IGNORE_INDEX as IGNORE

SHOWN = 5  # class names listed in a message before "..."
BLOCK = 4096  # images hashed per block (bounds the temporary copy for unaligned image sizes)


def check_splits(data: DataSplits, name: str) -> None:
    """Refuse a degenerate data set, warn about a test split that misses classes or leaks training images."""
    what = f"dataset={name}"
    splits = [("training", data.train), ("test", data.test)] + ([("validation", data.val)] if data.val else [])
    for title, split in splits:
        if len(split) == 0:
            raise KdError(
                f"{what}: the {title} split is empty; add images to it (for a data set split by kd, "
                "change dataset.test_fraction)"
            )
    names = list(data.class_names)
    if data.task == "detection":  # (one class is a detector: a box is told from the background)
        check_box_classes(data, what)
        return
    if data.num_classes < 2:
        raise KdError(
            f"{what} has {_count(data.num_classes, 'class')} ({', '.join(names)}); a classifier needs at "
            "least 2: add images of another class (an image folder needs one sub-folder per class)"
        )
    if data.task == "segmentation":
        check_masks(data, what)
        return
    train, test = split_labels(data.train), split_labels(data.test)
    val = split_labels(data.val) if data.val is not None else torch.zeros(0, dtype=torch.int64)
    if train is None or test is None or val is None:
        return  # labels known only by reading every image: not worth a pass over the data here
    for title, labels in (("training", train), ("test", test), ("validation", val)):
        outside = labels[(labels < 0) | (labels >= data.num_classes)]
        if len(outside):
            raise KdError(
                f"{what}: the {title} split has label {int(outside[0])}, outside 0..{data.num_classes - 1} "
                f"(the data set names {data.num_classes} classes); its files are inconsistent: "
                "replace them"
            )
    train_count = torch.bincount(train, minlength=data.num_classes)
    test_count = torch.bincount(test, minlength=data.num_classes)
    present = torch.nonzero(train_count).flatten().tolist()
    if len(present) < 2:
        raise KdError(
            f"{what}: the training split has images of {_names(names, present)} only; a classifier "
            "needs at least 2 classes: add training images of another class"
        )
    unlearnable = torch.nonzero((train_count == 0) & (test_count > 0)).flatten().tolist()
    if unlearnable:
        shown = _count(int(test_count[unlearnable].sum()), "image")
        raise KdError(
            f"{what}: the training split has no images of class {_names(names, unlearnable)}, which the "
            f"test split has ({shown}); the model could never predict it: add training images of it, or "
            "remove it from the test split"
        )
    val_only = torch.nonzero((train_count == 0) & (torch.bincount(val, minlength=data.num_classes) > 0))
    if len(val_only):
        raise KdError(
            f"{what}: the validation split has images of class {_names(names, val_only.flatten().tolist())}, "
            "which the training split lacks; add training images of it, or remove it from the validation split"
        )
    untested = torch.nonzero(test_count == 0).flatten().tolist()
    if untested:
        warn(
            f"{what}: the test split has no images of {len(untested)} of the {data.num_classes} classes "
            f"({_names(names, untested)}); their accuracy is not measured"
        )
    _warn_duplicates(data, what, train, test)


def check_box_classes(data: DataSplits, what: str) -> None:
    """A detection data set: every box's label names a class; the training split has boxes, and of every
    class the test or validation split has (a class never seen in training could never be detected)."""
    names = list(data.class_names)
    counts = {}
    for title, split in (("training", data.train), ("test", data.test), ("validation", data.val)):
        labels = split_labels(split) if split is not None else torch.zeros(0, dtype=torch.int64)
        assert labels is not None  # a detection split lists its boxes
        outside = labels[(labels < 0) | (labels >= data.num_classes)]
        if len(outside):
            raise KdError(
                f"{what}: the {title} split has a box of label {int(outside[0])}, outside 0..{data.num_classes - 1} "
                f"(the data set names {data.num_classes} classes); its annotations are inconsistent: fix them"
            )
        counts[title] = torch.bincount(labels, minlength=data.num_classes)
    if int(counts["training"].sum()) == 0:
        raise KdError(
            f"{what}: the training split has no boxes at all; a detector learns from boxes: annotate its images"
        )
    for title in ("test", "validation"):
        unlearnable = torch.nonzero((counts["training"] == 0) & (counts[title] > 0)).flatten().tolist()
        if unlearnable:
            raise KdError(
                f"{what}: the training split has no boxes of class {_names(names, unlearnable)}, which the {title} "
                f"split has; the detector could never find it: annotate training images of it, or remove it"
            )
    untested = torch.nonzero(counts["test"] == 0).flatten().tolist()
    if untested:
        warn(
            f"{what}: the test split has no boxes of {len(untested)} of the {data.num_classes} classes "
            f"({_names(names, untested)}); their AP is not measured"
        )


def check_masks(data: DataSplits, what: str) -> None:
    """Segmentation: every mask value a class or the ignore index; the training masks hold two classes at
    least; a class the test masks have but no training mask has is refused (it could never be predicted)."""
    names = list(data.class_names)
    counts = {}
    splits = [("training", data.train), ("test", data.test)] + ([("validation", data.val)] if data.val else [])
    for title, split in splits:
        values = _mask_values(split)
        if values is None:
            return
        outside = [v for v in torch.nonzero(values).flatten().tolist() if v >= data.num_classes and v != IGNORE]
        if outside:
            raise KdError(
                f"{what}: the {title} masks hold value {outside[0]}, neither one of the {data.num_classes} "
                f"classes (0..{data.num_classes - 1}) nor {IGNORE} (ignored); fix the masks or the class list"
            )
        counts[title] = values[: data.num_classes]
    present = torch.nonzero(counts["training"]).flatten().tolist()
    if len(present) < 2:
        raise KdError(
            f"{what}: the training masks hold {_names(names, present) if present else 'no class'} only; "
            "segmentation needs at least 2 classes: add masks with another class"
        )
    unlearnable = torch.nonzero((counts["training"] == 0) & (counts["test"] > 0)).flatten().tolist()
    if unlearnable:
        raise KdError(
            f"{what}: the test masks have class {_names(names, unlearnable)}, which no training mask has; the "
            "model could never predict it: add training images of it"
        )


def _mask_values(split: TensorSplit | FolderSplit | BoxSplit) -> torch.Tensor | None:
    """Pixels per mask value 0..255: counted here for masks in memory, by the scan for streamed ones."""
    if isinstance(split, FolderSplit):
        from kd_cli.data.mask_stream import class_pixels

        return class_pixels(split)
    assert isinstance(split, TensorSplit)  # (a mask data set has no box splits)
    return torch.bincount(split.labels.flatten().long(), minlength=256)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else ('es' if noun.endswith('s') else 's')}"


def _names(names: Sequence[str], indices: list[int]) -> str:
    shown = [names[i] if i < len(names) else str(i) for i in indices[:SHOWN]]
    return ", ".join(shown) + (f" and {len(indices) - SHOWN} more" if len(indices) > SHOWN else "")


def _warn_duplicates(data: DataSplits, what: str, train_labels: torch.Tensor, test_labels: torch.Tensor) -> None:
    if isinstance(data.train, TensorSplit) and isinstance(data.test, TensorSplit):
        pairs = tensor_duplicates(data.train.images, data.test.images)
        show = lambda i, j: f"test image #{i} = training image #{j}"  # noqa: E731
    elif isinstance(data.train, FolderSplit) and isinstance(data.test, FolderSplit):
        train_samples, test_samples = folder_samples(data.train.dataset), folder_samples(data.test.dataset)
        assert train_samples is not None and test_samples is not None  # check_splits knew their labels
        train_files = [path for path, _ in train_samples]
        test_files = [path for path, _ in test_samples]
        pairs = file_duplicates(train_files, test_files)

        def show(i: int, j: int) -> str:
            base = os.path.commonpath([test_files[i], train_files[j]])
            return f"{os.path.relpath(test_files[i], base)} = {os.path.relpath(train_files[j], base)} under {base}"
    else:
        return
    if not pairs:
        return
    relabelled = sum(int(test_labels[i]) != int(train_labels[j]) for i, j in pairs)
    other = f", {relabelled} of them with a different label" if relabelled else ""
    warn(
        f"{what}: {len(pairs)} of {len(test_labels)} test images are exact copies of training images "
        f"(e.g. {show(*pairs[0])}{other}); test accuracy overstates generalisation: remove them from one split"
    )


def tensor_duplicates(train: torch.Tensor, test: torch.Tensor) -> list[tuple[int, int]]:
    """(test index, training index) for each test image that equals some training image, byte for byte."""
    if train.shape[1:] != test.shape[1:]:
        return []
    a = train.reshape(len(train), -1).numpy()
    b = test.reshape(len(test), -1).numpy()
    keys = _keys(a.shape[1])
    ha, hb = row_hashes(a, keys), row_hashes(b, keys)
    candidates = np.flatnonzero(np.isin(hb, ha))
    if not len(candidates):
        return []
    order = np.argsort(ha, kind="stable")
    sorted_hashes = ha[order]
    pairs = []
    for i in candidates.tolist():  # equal hashes: confirm on the bytes, so a collision is never reported
        lo, hi = np.searchsorted(sorted_hashes, hb[i], "left"), np.searchsorted(sorted_hashes, hb[i], "right")
        match = next((int(j) for j in order[lo:hi] if np.array_equal(a[j], b[i])), None)
        if match is not None:
            pairs.append((i, match))
    return pairs


def _keys(row_bytes: int) -> np.ndarray:
    words = -(-row_bytes // 8)
    keys = np.random.default_rng(0x6B64).integers(1, 2**63, size=words, dtype=np.uint64)
    return keys | np.uint64(1)  # odd multipliers: a change in any one word always changes the sum


def row_hashes(rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of a uint8 matrix: the rows read as uint64 words, dot `keys`, mod 2**64.
    Equal rows always hash equal; numpy's integer dot wraps, and is a single fast pass over the data."""
    count, width = rows.shape
    out = np.empty(count, dtype=np.uint64)
    pad = len(keys) * 8 - width
    for start in range(0, count, BLOCK):
        block = rows[start : start + BLOCK]
        if pad:
            block = np.pad(block, ((0, 0), (0, pad)))
        out[start : start + BLOCK] = np.ascontiguousarray(block).view(np.uint64).dot(keys)
    return out


def file_duplicates(train: Sequence[str], test: Sequence[str]) -> list[tuple[int, int]]:
    """(test index, training index) for each test file whose bytes equal a training file's.

    In tiers, each run only on the files the previous one could not tell apart: sizes (one stat per
    file), then a BLAKE2b of the first 4 KiB, then of the whole file. The bytes read stay a small share of
    one epoch's reading even when most sizes collide (large JPEG folders), and nothing is read at all
    when no test file has the size of a training file."""
    with ThreadPoolExecutor(max_workers=_threads()) as pool:
        train_keys = [(size,) for size in pool.map(_size, train)]
        test_keys = [(size,) for size in pool.map(_size, test)]
        for digest in (_head_digest, _digest):
            shared = {
                key for key in set(train_keys) & set(test_keys) if key is not None and key[0] >= 0
            }  # -1: cannot stat; the loader names such files
            if not shared:
                return []
            train_keys = _refine(pool, digest, train, train_keys, shared)
            test_keys = _refine(pool, digest, test, test_keys, shared)
    first: dict[tuple, int] = {}
    for j, key in enumerate(train_keys):
        if key is not None:
            first.setdefault(key, j)
    return [(i, first[key]) for i, key in enumerate(test_keys) if key is not None and key in first]


def _refine(pool: ThreadPoolExecutor, digest, paths: Sequence[str], keys: list, shared: set) -> list:
    """Each key still in `shared` extended by `digest` of its file; every other key dropped (None)."""
    todo = [i for i, key in enumerate(keys) if key in shared]
    refined: list = [None] * len(keys)
    for i, value in zip(todo, pool.map(digest, [paths[i] for i in todo])):
        if value is not None:
            refined[i] = (*keys[i], value)
    return refined


def _threads() -> int:
    return min(16, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) * 2)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1  # unreadable: the loader names it when it gets there


def _head_digest(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return hashlib.blake2b(file.read(4096), digest_size=16).digest()
    except OSError:
        return None


def _digest(path: str) -> bytes | None:
    try:
        digest = hashlib.blake2b()
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
        return digest.digest()
    except OSError:
        return None
