"""Image folders (torchvision's ImageFolder): data too large for memory, streamed from disk.

Layouts accepted under `root`: `train/` plus `test/` (or `val/`), each holding one folder per class;
`train/`, `val/` and `test/` (val/ is then the validation split that chooses the best epoch); or class
folders alone, which are split into train and test by `test_fraction` and `split_seed`.

Unreadable files. Every image is read by `images.decode_rgb` (the one decoding path of kd: training,
evaluation and `kd predict` see the same pixels), which turns any failure to decode (a truncated PNG, a
corrupt JPEG, a text file named .png) into `UnreadableImage`, a one-line KdError naming the file and
pointing to `dataset.skip_unreadable`; the loader gets that line back intact from DataLoader workers
too. With `skip_unreadable=true` every file is decoded once at load time (in parallel: `scan`), before
the split, so the split stays deterministic and the fingerprint, which lists the files kept, says what
was skipped; one warning gives the count and the first few names.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Annotated

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from kd_cli.data.base import (
    DataSplits,
    FolderSplit,
    SplitSeed,
    absolute,
    fingerprint,
    folder_samples,
    register_dataset,
)
from kd_cli.data.images import decode_rgb, problem_of
from kd_cli.data.on_disk import brief, shown_path, walk_without_loops
from kd_cli.errors import KdError, warn
from kd_cli.registry import OpenFraction, PositiveInt, Range

LAYOUT = "train/ and test/ (or val/, or both) folders of class folders, or class folders alone"
SKIPPED_SHOWN = 3  # unreadable files named in the warning
PROCESS_SCAN_FROM = 4096  # files; below this, threads scan (no process start-up)


@register_dataset("imagefolder")
def imagefolder(
    root: str = "data/imagefolder",
    download: bool = False,
    image_size: PositiveInt = 224,
    test_fraction: OpenFraction = 0.2,
    split_seed: SplitSeed = 0,
    skip_unreadable: bool = False,
    crop_fraction: Annotated[float, Range(0, 1, low_open=True)] = 0.875,
) -> DataSplits:
    """`image_size` is the side of the square crops the model sees; `crop_fraction` the share of the
    (resized) image the evaluation crop keeps (0.875 as for ImageNet; 1 for models trained on whole
    images); `skip_unreadable` decodes every file at load time and leaves out those that fail (one
    warning), instead of stopping at the first."""
    root = absolute(root)
    if download:
        raise KdError(
            "an image folder cannot be downloaded; set dataset.download=false and put the images "
            f"under {root} ({LAYOUT})"
        )
    if not os.path.isdir(root):
        raise KdError(f"image folder not found: {root} (expected {LAYOUT}); set dataset.root=PATH")
    val = None
    if os.path.isdir(os.path.join(root, "train")):
        train, test, val = _official_split(root)
        if skip_unreadable:
            _drop_unreadable([split for split in (train, test, val) if split is not None], root)
    else:
        folder = _image_folder(root)
        if skip_unreadable:
            _drop_unreadable([folder], root)
        train, test = _random_split(folder, test_fraction, split_seed)
    classes = _base(train).classes
    if len(classes) < 2:
        raise KdError(
            f"{root} has {len(classes)} class folder ({', '.join(classes)}); a classifier needs at least "
            "2: add one folder of images per class"
        )
    return DataSplits(
        train=FolderSplit(train, image_size, crop_fraction),
        test=FolderSplit(test, image_size, crop_fraction),
        num_classes=len(classes),
        class_names=list(classes),
        in_channels=3,  # ImageFolder's loader converts every image to RGB
        input_size=image_size,
        fingerprint=fingerprint(
            *classes, *_digest(train, root), *_digest(test, root), *(_digest(val, root) if val is not None else [])
        ),
        val=FolderSplit(val, image_size, crop_fraction) if val is not None else None,
    )


def _official_split(root: str) -> tuple[ImageFolder, ImageFolder, ImageFolder | None]:
    """train/, test/ and val/ when all three exist; train/ with test/ or val/ alone: that one is the test split."""
    present = [name for name in ("train", "val", "test") if os.path.isdir(os.path.join(root, name))]
    if len(present) == 1:
        raise KdError(f"{root} has train/ but no test/ or val/ folder; add one (same class folders as train/)")
    test_name = "test" if "test" in present else "val"
    val_name = "val" if test_name == "test" and "val" in present else None
    train = _image_folder(os.path.join(root, "train"))
    test = _image_folder(os.path.join(root, test_name))
    val = _image_folder(os.path.join(root, val_name)) if val_name else None
    for name, other in ((test_name, test), (val_name, val)):
        if other is not None and train.classes != other.classes:
            odd = sorted(set(train.classes) ^ set(other.classes))
            raise KdError(
                f"train/ and {name}/ under {root} have different class folders "
                f"(only in one: {', '.join(odd[:5])}); give both the same classes"
            )
    return train, test, val


class LoopFreeImageFolder(ImageFolder):
    """torchvision's ImageFolder, read as a user means the folder:
    - a directory symlink back into a folder it is inside (a file-system loop, which os.walk(followlinks=True)
      goes round until the path is too long: 24 images became 197) is named in one warning and not followed,
      as `find -L` does; other symlinks, to files or to folders elsewhere, are followed;
    - hidden folders and files (`.ipynb_checkpoints/`, `._photo.png`) are neither classes nor images;
    - an entry with an image's name that is not a regular file (a broken symlink, a FIFO, whose read would
      wait for ever) is left out, named in one warning;
    - a class folder without images is one line saying so (and that GIFs and other formats are not read)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise KdError(f"{shown_path(directory)} has no class folders; expected {LAYOUT}")
        return classes, {name: index for index, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        from torchvision.datasets.folder import has_file_allowed_extension

        def valid(path: str) -> bool:
            return is_valid_file(path) if is_valid_file is not None else has_file_allowed_extension(path, extensions)

        samples, special = [], []
        for name in sorted(class_to_idx):
            found = []
            for folder, files in walk_without_loops(os.path.join(directory, name)):
                paths = [os.path.join(folder, file) for file in sorted(files)]
                found += [path for path in paths if valid(path) and os.path.isfile(path)]
                special += [path for path in paths if valid(path) and not os.path.isfile(path)]
            if not found and not allow_empty:
                raise KdError(_no_images(directory, name))
            samples += [(path, class_to_idx[name]) for path in found]
        if special:
            shown = ", ".join(shown_path(os.path.relpath(path, directory)) for path in special[:SKIPPED_SHOWN])
            more = f" and {len(special) - SKIPPED_SHOWN} more" if len(special) > SKIPPED_SHOWN else ""
            warn(
                f"left out {len(special)} entr{'y' if len(special) == 1 else 'ies'} under {shown_path(directory)} "
                f"named like images that are not regular files (a broken symlink, a FIFO): {shown}{more}"
            )
        return samples


def _no_images(directory: str, name: str) -> str:
    """One line for a class folder with no image kd reads, naming what it does hold."""
    suffixes = sorted(
        {
            os.path.splitext(file)[1].lower()
            for _, files in walk_without_loops(os.path.join(directory, name))
            for file in files
        }
        - {""}
    )
    held = (
        f" (it holds {', '.join(suffixes[:5])} files, which kd does not read: convert them to PNG or JPEG)"
        if suffixes
        else ""
    )
    return (
        f"class folder {shown_path(os.path.join(directory, name))} has no images{held}; kd reads "
        f"{', '.join(IMG_EXTENSIONS)}: add images, or remove the folder"
    )


def _image_folder(path: str) -> ImageFolder:
    try:
        return LoopFreeImageFolder(path, loader=decode_rgb)
    except OSError as error:  # FileNotFoundError: no class folders, or a class folder without images
        raise KdError(f"cannot read image folder {path} ({brief(error)}); expected {LAYOUT}") from error


def _drop_unreadable(folders: list[ImageFolder], root: str) -> None:
    """Decode every file of `folders` (in parallel, in a fixed order) and remove those that fail from
    their sample lists; warn once with the count and the first few names."""
    paths = [path for folder in folders for path, _ in folder.samples]
    problems = dict(zip(paths, scan(paths, root)))
    bad = [path for path in paths if problems[path]]
    if not bad:
        return
    for folder in folders:
        folder.samples = [(path, label) for path, label in folder.samples if not problems[path]]
        folder.imgs = folder.samples
        folder.targets = [label for _, label in folder.samples]
    shown = "; ".join(f"{os.path.relpath(path, root)} ({problems[path]})" for path in bad[:SKIPPED_SHOWN])
    more = f"; and {len(bad) - SKIPPED_SHOWN} more" if len(bad) > SKIPPED_SHOWN else ""
    warn(
        f"skipped {len(bad)} unreadable image(s) of {len(paths)} under {root} (dataset.skip_unreadable=true): "
        f"{shown}{more}"
    )


def scan(paths: list[str], root: str, processes: bool | None = None) -> list[str | None]:
    """What is wrong with each file (None: it decodes), in the order given.

    Large folders are decoded by a process per core (the way DataLoader workers decode), which also keeps
    a decoder crash out of this process; small ones by threads, which start at once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if processes is None:
        processes = cores > 1 and len(paths) >= PROCESS_SCAN_FROM
    if not processes:
        with ThreadPoolExecutor(max_workers=min(32, 2 * cores)) as pool:
            return list(pool.map(problem_of, paths))
    try:
        with ProcessPoolExecutor(max_workers=cores) as pool:
            return list(pool.map(problem_of, paths, chunksize=64))
    except BrokenProcessPool:
        raise KdError(
            f"a file under {root} crashed the image decoder while kd checked every image "
            "(dataset.skip_unreadable=true); it is crafted or badly damaged: find it and delete it"
        ) from None


def _random_split(folder: ImageFolder, test_fraction: float, seed: int) -> tuple[Subset, Subset]:
    from sklearn.model_selection import train_test_split

    try:  # stratified, so every class keeps its share in both splits
        train_idx, test_idx = train_test_split(
            np.arange(len(folder)), test_size=test_fraction, stratify=folder.targets, random_state=seed
        )
    except ValueError as error:  # e.g. a class with a single image
        raise KdError(
            f"cannot split {folder.root} into train and test ({brief(error)}); add images or make "
            "train/ and test/ folders"
        ) from error
    return Subset(folder, sorted(train_idx.tolist())), Subset(folder, sorted(test_idx.tolist()))


def _base(dataset: Dataset) -> ImageFolder:
    return dataset.dataset if isinstance(dataset, Subset) else dataset


def _digest(dataset: Dataset, root: str, files_read: int = 8) -> list[bytes | str]:
    """Labels and relative paths of every image, plus the bytes of a few: no full pass over the disk."""
    samples = folder_samples(dataset)
    assert samples is not None  # an ImageFolder (or a Subset of one) lists its files
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64).numpy().tobytes()
    paths = "\n".join(os.path.relpath(path, root) for path, _ in samples)
    step = max(1, len(samples) // files_read)
    contents = [_read(path) for path, _ in samples[::step][:files_read]]
    return [str(len(samples)), labels, paths, *contents]


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


imagefolder.image_channels = 3  # type: ignore[attr-defined]  # a function attribute; decode_rgb makes every image RGB
