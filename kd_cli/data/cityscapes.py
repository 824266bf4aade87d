"""Cityscapes (`dataset=cityscapes`): street scenes from 50 cities, read by torchvision's `Cityscapes`
from `root/leftImg8bit/{train,val}/CITY/*_leftImg8bit.png` and `root/gtFine/.../*_gtFine_labelIds.png`.

The stored label ids (0..33) are mapped to the 19 classes everyone trains and scores on (road, sidewalk,
..., bicycle) by torchvision's own `Cityscapes.classes` table (cityscapesScripts' `trainId`); the other ids
(unlabelled, ego vehicle, parking, ...) become 255, ignored. `train` trains and `val` tests: Cityscapes'
test labels are withheld by its authors. Cityscapes is downloaded after registering at
cityscapes-dataset.com (`leftImg8bit_trainvaltest.zip`, `gtFine_trainvaltest.zip`); torchvision unpacks
the zips when they sit in `root`.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np

from kd_cli.data.base import DataSplits, absolute, register_dataset
from kd_cli.data.mask_stream import segmentation_splits
from kd_cli.data.masks import BadMask, ImageSide, read_mask
from kd_cli.data.on_disk import shown_path
from kd_cli.errors import KdError
from kd_cli.tasks import IGNORE_INDEX

LABEL_IDS = 34  # labelIds PNGs hold 0..33


def train_id_table() -> tuple[np.ndarray, list[str]]:
    """label id -> train id (255: ignored), and the 19 class names in train id order."""
    from torchvision.datasets import Cityscapes

    table = np.full(LABEL_IDS, IGNORE_INDEX, dtype=np.int64)
    names: dict[int, str] = {}
    for entry in Cityscapes.classes:
        if 0 <= entry.id < LABEL_IDS and 0 <= entry.train_id < IGNORE_INDEX:
            table[entry.id] = entry.train_id
            names[entry.train_id] = entry.name
    return table, [names[i] for i in range(len(names))]


def labels_as_train_ids(table: np.ndarray):
    def load(path: str) -> np.ndarray:
        if not os.path.isfile(path):
            raise BadMask(f"no label file {shown_path(path)} for its image")
        ids = read_mask(path)
        if ids.max(initial=0) >= LABEL_IDS:
            raise BadMask(
                f"mask {shown_path(path)} holds value {int(ids.max())}, not a Cityscapes label id (0..33); "
                "give the *_gtFine_labelIds.png files (not the color or trainIds ones)"
            )
        return table[ids]

    return load


@register_dataset("cityscapes")
def cityscapes(
    root: str = "data/cityscapes",
    download: bool = False,
    mode: Literal["fine", "coarse"] = "fine",
    image_size: ImageSide = 512,
    skip_bad_masks: bool = False,
    stream: bool = False,
) -> DataSplits:
    """`train` to train, `val` to test, at `image_size` x `image_size`; mode=fine (gtFine) or coarse (gtCoarse)."""
    import torchvision.datasets as tv

    if download:
        raise KdError(
            "dataset=cityscapes cannot be downloaded by kd: register at https://www.cityscapes-dataset.com, "
            f"put leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip in {absolute(root)}, and run "
            "without dataset.download"
        )
    table, names = train_id_table()
    folder = absolute(root)
    titled = []
    for split in ("train", "val"):
        try:
            listing = tv.Cityscapes(folder, split=split, mode=mode, target_type="semantic")
        except (RuntimeError, OSError):
            gt = f"gt{mode.capitalize()}"
            raise KdError(
                f"Cityscapes {split} not found under {folder} (expected leftImg8bit/{split}/ and "
                f"{gt}/{split}/, or leftImg8bit_trainvaltest.zip and {gt}_trainvaltest.zip from cityscapes-dataset.com)"
            ) from None
        titled.append((f"Cityscapes {split}", sorted(zip(listing.images, (t[0] for t in listing.targets)))))
    extra = ("cityscapes", str(image_size), mode)
    return segmentation_splits(
        titled, names, image_size, skip_bad_masks, stream, *extra, load_mask=labels_as_train_ids(table)
    )


cityscapes.task = "segmentation"  # type: ignore[attr-defined]  # data.base.dataset_task
cityscapes.image_channels = 3  # type: ignore[attr-defined]  # base.expected_channels
