"""What every data set returns, the data-set registry, and `load_dataset`, the one door to them.

`check_dataset_config` checks a dataset config node without loading anything (the run calls it before
any work); `load_dataset` calls it too, then the loader, then `checks.check_splits` (degenerate splits
refused, leaks between train and test reported), so every data set gets the same checks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sized
from dataclasses import dataclass
from typing import Annotated, Any, cast

import torch
from torch.utils.data import Dataset, Subset

from kd_cli.errors import KdError
from kd_cli.registry import NonNegativeInt, Range, Registry, value_problem

DATASETS = Registry("data set")
register_dataset = DATASETS.register

# Keys of a dataset config node that the framework reads itself; every other key is an option of the
# registered loader function (checked against its signature, so a typo is a one-line error).
COMMON_KEYS = frozenset(
    {"name", "mean", "std", "default_teacher", "default_student", "hflip", "crop_padding", "val_fraction", "aug_seed"}
)

# Types of the common keys, in the registry's terms (so messages read like those of loader options).
COMMON_TYPES: dict[str, Any] = {
    "mean": list[float],
    "std": Annotated[list[float], Range(0, low_open=True)],
    "crop_padding": NonNegativeInt,
    "hflip": bool,
    "default_teacher": str,
    "default_student": str,
    # share of each training class held out for model selection (0: none; see `hold_out_validation`)
    "val_fraction": Annotated[float, Range(0, 1, high_open=True)],
    # seed of the training stream (shuffle and augmentation); null: the run's `seed` (see stream_seed)
    "aug_seed": Annotated[int, Range(0, 2**63 - 1)] | None,
}

# Seeds of scikit-learn splits (its random_state must fit in 32 bits) and of torch generators.
SplitSeed = Annotated[int, Range(0, 2**32 - 1)]
TorchSeed = Annotated[int, Range(-(2**63), 2**64 - 1)]
ClassCount = Annotated[int, Range(2, 1_000_000)]  # a classifier needs two classes at least


@dataclass
class TensorSplit:
    """A split that fits in memory: kept as uint8 so a whole data set sits on the GPU cheaply."""

    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64 (N,) class indices; segmentation: uint8 (N, H, W) masks (255: ignored)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class BoxSplit:
    """A detection split in memory: uint8 images (N, C, H, W), all of one size (the size the model sees),
    and per image its boxes (k, 4) float32 x1 y1 x2 y2 pixels and labels (k,) int64 in 0..C-1 (k may be 0:
    an image without objects is kept, it teaches the detector what background is). `image_ids` are the
    data's own ids (a COCO file's), written into results files; `scales` the factor each image was
    resized by (model pixels per original pixel), to write boxes back in the data's own pixels."""

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    image_ids: list[int]
    scales: list[float] | None = None
    sizes: list[tuple[int, int]] | None = None  # (H, W) of each image as the data has it; None: as held
    crowds: list[torch.Tensor] | None = None  # per box: COCO's iscrowd / VOC's difficult (test splits only)

    def __len__(self) -> int:
        return len(self.images)

    def box_labels(self) -> torch.Tensor:
        """Every box's label, image after image (what the class checks count); crowd boxes, which are
        neither found nor missed, left out."""
        if self.crowds is not None:
            return torch.cat(
                [torch.zeros(0, dtype=torch.int64), *(lab[~c] for lab, c in zip(self.labels, self.crowds))]
            )
        return torch.cat([torch.zeros(0, dtype=torch.int64), *self.labels])


@dataclass
class FolderSplit:
    """A split streamed from disk; the loader attaches the transforms."""

    dataset: Dataset  # yields (uint8 RGB image tensor (3, H, W), int label): data/images.decode_rgb
    image_size: int = 224  # side of the square crops the loader cuts (the data set's input_size)
    crop_fraction: float = 0.875  # evaluation: resize to image_size / crop_fraction, keep the centre
    task: str = "classification"  # segmentation: (image, mask) pairs, streamed by data/mask_stream.py

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))  # map-style: an ImageFolder, or a Subset of one


@dataclass
class DataSplits:
    train: TensorSplit | FolderSplit | BoxSplit
    test: TensorSplit | FolderSplit | BoxSplit
    num_classes: int
    class_names: list[str]
    in_channels: int
    input_size: int  # side of the (square) images the model sees
    fingerprint: str  # short sha256 identifying the data, recorded in env.json
    # Held out from training to choose the best epoch (dataset.val_fraction, or the data set's own
    # validation folder); None: no validation split, the loop then reports the test-set best.
    val: TensorSplit | FolderSplit | BoxSplit | None = None
    task: str = "classification"  # what a label is and how a model is scored (kd_cli/tasks)
    category_ids: list[int] | None = None  # detection: the file's id of each label (results files use them)


def dataset_task(name: str) -> str:
    """The task of a registered data set (its loader's `task` attribute; classification when unset),
    known before anything is loaded, so a model or method of another task is refused first."""
    return getattr(DATASETS.get(name), "task", "classification")


def check_dataset_config(cfg: Mapping[str, Any]) -> None:
    """Every value of a dataset config node, checked without loading anything: the name is a
    registered data set; the loader's options have its names, types and ranges (its signature);
    `mean`/`std` are lists of finite numbers of equal length with every std > 0, as many as the data
    set's channels (or one) where that is known from the config; `crop_padding` >= 0; `hflip` a bool.
    Keys that are absent are not required here (a partial node is checked as far as it goes)."""
    cfg = plain_dict(cfg)
    name = cfg.get("name")
    if name is None:
        raise KdError("the dataset config has no 'name'; choose one with dataset=NAME")
    if not isinstance(name, str):
        raise KdError(
            f"dataset.name={_show(name)} must be a string; choose one with dataset=NAME "
            f"(one of: {', '.join(DATASETS.names())})"
        )
    options = dataset_options(cfg)
    DATASETS.check(name, options, path="dataset")
    for key, hint in COMMON_TYPES.items():
        if key in cfg:
            problem = value_problem(cfg[key], hint)
            if problem is None and key in ("mean", "std") and not cfg[key]:
                problem = "a list of at least one number"
            if problem:
                raise KdError(f"dataset.{key}={_show(cfg[key])} must be {problem} (data set '{name}')")
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is not None and std is not None and len(mean) != len(std):
        raise KdError(
            f"dataset.mean has {len(mean)} value(s) but dataset.std has {len(std)}; "
            "give one per channel in both (or one each for every channel)"
        )
    channels = expected_channels(name, options)
    for key, values in (("mean", mean), ("std", std)):
        if channels is not None and values is not None and len(values) not in (1, channels):
            raise KdError(
                f"dataset.{key} has {len(values)} values but {name} images have {channels} channel(s); "
                f"give {channels} values (or one for all channels)"
            )


def expected_channels(name: str, options: Mapping[str, Any]) -> int | None:
    """The channels a data set's images will have, when the config tells (a loader's `image_channels`:
    an int, or a function of its options); None when only loading would tell."""
    import inspect

    fn = DATASETS.get(name)
    channels = getattr(fn, "image_channels", None)
    if callable(channels):
        defaults = {
            k: p.default
            for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        return channels({**defaults, **options})
    return channels


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def dataset_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in cfg.items() if key not in COMMON_KEYS}


def plain_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # omegaconf comes with hydra; plain dicts work without it
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True))
    return dict(cfg)


def folder_samples(dataset: Dataset) -> list[tuple[str, int]] | None:
    """(path, label) of every sample of an ImageFolder-like data set (through Subsets); None when the
    data set does not list its files (then its labels are unknown until its images are read)."""
    if isinstance(dataset, Subset):
        inner = folder_samples(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    return None if samples is None else [(path, int(label)) for path, label in samples]


def split_labels(split: TensorSplit | FolderSplit | BoxSplit) -> torch.Tensor | None:
    """Every label of a split, without reading images (a detection split's: every box's); None when
    they cannot be known that way."""
    if isinstance(split, TensorSplit):
        return split.labels
    if isinstance(split, BoxSplit):
        return split.box_labels()
    samples = folder_samples(split.dataset)
    return None if samples is None else torch.tensor([label for _, label in samples], dtype=torch.int64)


def absolute(root: str | os.PathLike) -> str:
    """Absolute form of a user path, for messages that must say exactly where we looked."""
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def fingerprint(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        # (surrogateescape: a file name that is not UTF-8 hashes as its own bytes)
        digest.update(part.encode("utf-8", "surrogateescape") if isinstance(part, str) else part)
        digest.update(b"\0")  # separator, so ("ab", "c") and ("a", "bc") differ
    return digest.hexdigest()[:16]


def tensor_split_digest(split: TensorSplit | BoxSplit, samples: int = 256) -> list[bytes | str]:
    """Shape, every label, and the bytes of evenly spaced images: cheap, yet changes with the data."""
    step = max(1, len(split) // samples)
    sample = split.images[::step].contiguous()
    if isinstance(split, BoxSplit):
        boxes = torch.cat([torch.zeros(0, 4), *split.boxes])
        labels: list[bytes | str] = [
            split.box_labels().numpy().tobytes(),
            boxes.numpy().tobytes(),
            str(split.image_ids),
        ]
        return [str(tuple(split.images.shape)), *labels, sample.numpy().tobytes()]
    return [str(tuple(split.images.shape)), split.labels.numpy().tobytes(), sample.numpy().tobytes()]


def tensor_splits(
    train: TensorSplit | BoxSplit,
    test: TensorSplit | BoxSplit,
    class_names: list[str],
    *extra: str,
    task: str = "classification",
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
        task=task,
    )


def _check_tensor_split(split: TensorSplit | BoxSplit) -> None:
    # Catch loader bugs here, where they are cheap to find, not as a shape error deep in training.
    images = split.images
    assert images.dtype == torch.uint8 and images.dim() == 4, (images.dtype, images.shape)
    if isinstance(split, BoxSplit):
        assert len(split.boxes) == len(split.labels) == len(split.image_ids) == len(images)
        for boxes, labels in zip(split.boxes, split.labels):
            assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4), boxes.shape
            assert labels.dtype == torch.int64, labels.dtype
        return
    labels = split.labels
    if labels.dim() == 3:  # segmentation masks, one per image, of its size
        assert labels.dtype == torch.uint8 and labels.shape == (images.shape[0], *images.shape[2:]), labels.shape
        return
    assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],), (labels.dtype, labels.shape)
