"""Make the README's detection walk-through inputs offline: scenes of scikit-learn's handwritten digits
(kd's digit_detection composer: several digits pasted on a canvas, a box around each digit's ink) written
as a COCO-format data set, as a labelling tool exports one: train/ and val/ image folders of PNG files, an
instances JSON each (category ids with gaps, names "zero" .. "nine", boxes as [x, y, width, height]), and
a folder of new scenes, some of them wide, for `kd predict`.

    python examples/detection_data.py digits_coco

With your own COCO-format data, skip this and point dataset.root (and the annotation names) at yours.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

from kd_cli.data import load_dataset

CATEGORY_IDS = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89]  # a file's own ids, with gaps: kd maps them and back
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NEW = 8  # scenes kept out of both splits for `kd predict`


def write_split(folder: Path, split, first: int = 0) -> None:
    """folder/images/NNNNNN.png and folder/instances.json for the split's scenes from `first` on."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(first, len(split)):
        name = f"{index:06d}.png"
        picture = Image.fromarray(split.images[index, 0].numpy()).convert("RGB")
        picture.save(folder / "images" / name)
        images.append({"id": index + 1, "file_name": name, "width": picture.width, "height": picture.height})
        for box, label in zip(split.boxes[index].tolist(), split.labels[index].tolist()):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": CATEGORY_IDS[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": n, "supercategory": "digit"} for i, n in zip(CATEGORY_IDS, NAMES)]
    document = {"images": images, "annotations": annotations, "categories": categories}
    (folder / "instances.json").write_text(json.dumps(document))


def write_new(folder: Path, split) -> None:
    """Unlabelled scenes to predict; every other one stretched to twice its width (kd letterboxes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(NEW):
        picture = Image.fromarray(split.images[index, 0].numpy()).convert("RGB")
        if index % 2:
            picture = picture.resize((2 * picture.width, picture.height), Image.BILINEAR)
        picture.save(folder / f"scene_{index}.png")


def main(root: Path) -> None:
    data = load_dataset({"name": "digit_detection", "train_scenes": 1500, "test_scenes": 400 + NEW, "canvas": 64})
    write_split(root / "train", data.train)
    write_split(root / "val", data.test, first=NEW)
    write_new(root.parent / f"{root.name}_new", data.test)
    print(f"wrote {root}/train ({len(data.train)} scenes), {root}/val ({len(data.test) - NEW}), {root.name}_new/")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "digits_coco"))
