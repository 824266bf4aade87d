"""Detection data (issue 24): boxes of the digit scenes, the embedded default's ground truth."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd_cli.data import load_dataset
from kd_cli.data.boxes import coco_boxes, voc_boxes, yolo_boxes
from kd_cli.data.scenes import compose_scenes, scale_digits, scene_boxes
from kd_cli.errors import KdError


def scaled_digits() -> tuple[torch.Tensor, torch.Tensor]:
    train = load_dataset({"name": "digits"}).train
    return scale_digits(train.images, 2.0), train.labels


def test_one_digit_per_scene_has_the_box_of_its_mask():
    digits, labels = scaled_digits()
    _, masks = compose_scenes(digits, labels, count=40, canvas=48, per_scene=1, seed=3)
    for mask, (boxes, classes) in zip(masks, scene_boxes(digits, labels, 40, 48, 1, 3), strict=True):
        rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
        assert boxes.tolist() == [[cols[0].item(), rows[0].item(), cols[-1].item() + 1, rows[-1].item() + 1]]
        assert classes.tolist() == [int(mask.max()) - 1]  # mask class d + 1 is digit d


def test_every_labelled_pixel_of_a_crowded_scene_lies_in_a_box_of_its_class():
    digits, labels = scaled_digits()
    _, masks = compose_scenes(digits, labels, count=30, canvas=48, per_scene=4, seed=7)
    scenes = scene_boxes(digits, labels, 30, 48, 4, 7)
    again = scene_boxes(digits, labels, 30, 48, 4, 7)  # deterministic in the seed
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(scenes, again, strict=True))
    for mask, (boxes, classes) in zip(masks, scenes, strict=True):
        assert len(boxes) == 4 and (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 48).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        for y, x in torch.nonzero(mask):
            c = int(mask[y, x])
            inside = (boxes[:, 0] <= x) & (x < boxes[:, 2]) & (boxes[:, 1] <= y) & (y < boxes[:, 3])
            assert (inside & (classes == c - 1)).any(), (int(y), int(x), c)


# ---------------------------------------------------------------- the readers, on files in the real layouts


def write_scene_images(folder: Path, count: int, seed: int = 0) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """`count` digit scenes (48 px, 3 digits) saved as PNGs in `folder`: (file name, boxes, labels)."""
    digits, labels = scaled_digits()
    images, _ = compose_scenes(digits, labels, count=count, canvas=48, per_scene=3, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k, (image, (boxes, classes)) in enumerate(zip(images, scene_boxes(digits, labels, count, 48, 3, seed))):
        name = f"scene_{k:03d}.png"
        Image.fromarray(image[0].numpy()).save(folder / name)
        written.append((name, boxes, classes))
    return written


GAPPY = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89]  # a COCO file's category ids: not 0..C-1


def coco_file(root: Path, scenes, ids=GAPPY, extra_annotation: dict | None = None) -> Path:
    """instances.json for `scenes`, category id ids[d] for digit d (gaps, as COCO's), the image ids 100+k."""
    annotations = [
        {
            "id": len(scenes) * 10 + k * 5 + j,
            "image_id": 100 + k,
            "category_id": ids[int(label)],
            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
            "area": float((box[2] - box[0]) * (box[3] - box[1])),
            "iscrowd": 0,
        }
        for k, (_, boxes, labels) in enumerate(scenes)
        for j, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist()))
    ]
    if extra_annotation:
        annotations.append(extra_annotation)
    document = {
        "images": [
            {"id": 100 + k, "file_name": name, "width": 48, "height": 48} for k, (name, _, _) in enumerate(scenes)
        ]
        + [{"id": 999, "file_name": "empty.png", "width": 48, "height": 48}],
        "annotations": annotations,
        "categories": [{"id": ids[d], "name": f"digit {d}"} for d in range(10)],
    }
    Image.fromarray(np.zeros((48, 48), dtype=np.uint8)).save(root / "images" / "empty.png")  # no boxes: kept
    path = root / "instances.json"
    path.write_text(json.dumps(document))
    return path


def test_coco_json_is_read_as_written_ids_with_gaps_and_images_without_boxes(tmp_path):
    scenes = write_scene_images(tmp_path / "images", 6)
    read = coco_boxes(coco_file(tmp_path, scenes), tmp_path / "images")
    assert read.class_names == [f"digit {d}" for d in range(10)] and read.category_ids == GAPPY
    by_id = {r.image_id: r for r in read.records}
    assert sorted(by_id) == [100, 101, 102, 103, 104, 105, 999] and len(by_id[999].boxes) == 0
    for k, (name, boxes, labels) in enumerate(scenes):
        record = by_id[100 + k]
        assert record.image.endswith(name) and (record.width, record.height) == (48, 48)
        assert torch.allclose(record.boxes, boxes) and torch.equal(record.labels, labels)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"bbox": [40, 40, 20, 20]}, "lies outside the 48x48 image"),
        ({"bbox": [10, 10, 0, 5]}, "has no area"),
        ({"bbox": [10, 10, -3, 5]}, "has no area"),
        ({"category_id": 4}, "category_id 4 is not in 'categories'"),
        ({"bbox": "wide"}, "'bbox' must be [x, y, width, height]"),
    ],
)
def test_a_bad_coco_annotation_is_one_line_naming_it_or_skipped_and_counted(tmp_path, bad, fragment):
    scenes = write_scene_images(tmp_path / "images", 3)
    annotation = {"id": 777, "image_id": 101, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0, **bad}
    path = coco_file(tmp_path, scenes, extra_annotation=annotation)
    with pytest.raises(KdError) as refused:
        coco_boxes(path, tmp_path / "images")
    message = str(refused.value)
    assert "instances.json (image id 101), annotation 777" in message and fragment in message
    assert "skip_bad_boxes=true" in message and "\n" not in message
    read = coco_boxes(path, tmp_path / "images", skip_bad=True)
    assert [r.image_id for r in read.records] == [100, 102, 999] and len(read.skipped) == 1


def test_a_missing_image_and_a_broken_json_are_one_line(tmp_path):
    scenes = write_scene_images(tmp_path / "images", 2)
    path = coco_file(tmp_path, scenes)
    (tmp_path / "images" / scenes[1][0]).unlink()
    with pytest.raises(KdError, match=r"image id 101\): image .*scene_001.png not found"):
        coco_boxes(path, tmp_path / "images")
    path.write_text('{"images": [')
    with pytest.raises(KdError, match="cannot be read"):
        coco_boxes(path, tmp_path / "images")


def yolo_folder(root: Path, scenes, split: str = "train") -> None:
    """The Ultralytics layout: images/<split>/ and labels/<split>/NAME.txt of `class cx cy w h` fractions."""
    (root / "labels" / split).mkdir(parents=True)
    for name, boxes, labels in scenes[:-1]:  # the last image has no label file: no boxes
        rows = [
            f"{label} {(b[0] + b[2]) / 96:.6f} {(b[1] + b[3]) / 96:.6f} "
            f"{(b[2] - b[0]) / 48:.6f} {(b[3] - b[1]) / 48:.6f}"
            for b, label in zip(boxes.tolist(), labels.tolist())
        ]
        (root / "labels" / split / name.replace(".png", ".txt")).write_text("\n".join(rows) + "\n")


def test_a_yolo_folder_is_read_as_written(tmp_path):
    scenes = write_scene_images(tmp_path / "images" / "train", 5)
    yolo_folder(tmp_path, scenes)
    read = yolo_boxes(tmp_path, "train", [str(d) for d in range(10)])
    assert read.category_ids == list(range(10)) and len(read.records) == 5
    for record, (name, boxes, labels) in zip(read.records, scenes, strict=True):
        assert record.image.endswith(name)
        if name == scenes[-1][0]:
            assert len(record.boxes) == 0
        else:
            assert torch.allclose(record.boxes, boxes, atol=1e-3) and torch.equal(record.labels, labels)


@pytest.mark.parametrize(
    "row, fragment",
    [
        ("12 0.5 0.5 0.2 0.2", "class 12 is not one of the 10 class names"),
        ("1 0.95 0.5 0.3 0.2", "lies outside the 48x48 image"),
        ("1 0.5 0.5 0 0.2", "has no area"),
        ("1 0.5 0.5 0.2", "is not `class cx cy w h`"),
        ("one 0.5 0.5 0.2 0.2", "(numbers)"),
    ],
)
def test_a_bad_yolo_row_is_one_line_naming_the_file_and_line_or_skipped(tmp_path, row, fragment):
    scenes = write_scene_images(tmp_path / "images" / "train", 3)
    yolo_folder(tmp_path, scenes)
    labels = tmp_path / "labels" / "train" / "scene_001.txt"
    labels.write_text(labels.read_text() + row + "\n")
    with pytest.raises(KdError) as refused:
        yolo_boxes(tmp_path, "train", [str(d) for d in range(10)])
    assert "scene_001.txt:4" in str(refused.value) and fragment in str(refused.value)
    read = yolo_boxes(tmp_path, "train", [str(d) for d in range(10)], skip_bad=True)
    assert len(read.records) == 2 and len(read.skipped) == 1


def test_a_yolo_folder_without_its_images_says_where_they_go(tmp_path):
    with pytest.raises(KdError, match="expected images/val/ beside labels/val/"):
        yolo_boxes(tmp_path, "val", ["a"])


VOC_NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow"]


def voc_tree(root: Path, scenes, year: str = "2007", image_set: str = "trainval") -> Path:
    """VOCdevkit/VOC<year>/: JPEGImages/, Annotations/NAME.xml (1-based inclusive corners, digit d as VOC's
    d-th class, the first box of each image `difficult`), ImageSets/Main/<image_set>.txt."""
    folder = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    stems = []
    for name, boxes, labels in scenes:
        stem = Path(name).stem
        Image.open(root / "scenes" / name).convert("RGB").save(folder / "JPEGImages" / f"{stem}.jpg")
        objects = "".join(
            f"<object><name>{VOC_NAMES[label]}</name><difficult>{int(k == 0)}</difficult><bndbox>"
            f"<xmin>{b[0] + 1:g}</xmin><ymin>{b[1] + 1:g}</ymin><xmax>{b[2]:g}</xmax><ymax>{b[3]:g}</ymax>"
            "</bndbox></object>"
            for k, (b, label) in enumerate(zip(boxes.tolist(), labels.tolist()))
        )
        xml = f"<annotation><filename>{stem}.jpg</filename><size><width>48</width><height>48</height>"
        (folder / "Annotations" / f"{stem}.xml").write_text(xml + f"<depth>3</depth></size>{objects}</annotation>")
        stems.append(stem)
    (folder / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(stems) + "\n")
    return folder


def test_voc_xml_is_read_through_torchvisions_listing_corners_and_difficult_as_written(tmp_path):
    scenes = write_scene_images(tmp_path / "scenes", 4)
    voc_tree(tmp_path, scenes)
    read = voc_boxes(str(tmp_path), "2007", "trainval")
    assert read.class_names[:3] == ["aeroplane", "bicycle", "bird"] and len(read.class_names) == 20
    for record, (name, boxes, labels) in zip(read.records, scenes, strict=True):
        assert record.image.endswith(Path(name).stem + ".jpg") and (record.width, record.height) == (48, 48)
        assert torch.allclose(record.boxes, boxes) and torch.equal(record.labels, labels)
        assert record.crowd.tolist() == [True] + [False] * (len(labels) - 1)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda xml: xml.replace("<name>", "<name>x", 1), "is not one of VOC's 20 classes"),
        (lambda xml: xml.replace("<xmax>", "<xmax>9", 1), "lies outside the 48x48 image"),
        (lambda xml: xml[:-5], "cannot be read as XML"),
        (lambda xml: xml.replace("<width>48</width>", ""), "<size> must give <width> and <height>"),
    ],
)
def test_a_bad_voc_annotation_is_one_line_naming_the_file_or_skipped(tmp_path, edit, fragment):
    scenes = write_scene_images(tmp_path / "scenes", 3)
    folder = voc_tree(tmp_path, scenes)
    xml = folder / "Annotations" / "scene_001.xml"
    xml.write_text(edit(xml.read_text()))
    with pytest.raises(KdError) as refused:
        voc_boxes(str(tmp_path), "2007", "trainval")
    assert "scene_001.xml" in str(refused.value) and fragment in str(refused.value)
    assert len(voc_boxes(str(tmp_path), "2007", "trainval", skip_bad=True).records) == 2


def test_a_missing_voc_folder_says_what_belongs_there(tmp_path):
    with pytest.raises(KdError, match="ImageSets/Main/trainval.txt"):
        voc_boxes(str(tmp_path), "2007", "trainval")


# ---------------------------------------------------------------- what a fuzzer found (each was a raw exception
# or a silent misreading)


def test_yolo_label_files_in_other_encodings_and_unreadable_images(tmp_path):
    scenes = write_scene_images(tmp_path / "images" / "train", 3)
    yolo_folder(tmp_path, scenes)
    names = [str(d) for d in range(10)]
    first = tmp_path / "labels" / "train" / "scene_000.txt"
    first.write_bytes(b"\xef\xbb\xbf" + first.read_bytes())  # a byte-order mark: read, not refused
    assert torch.equal(yolo_boxes(tmp_path, "train", names).records[0].labels, scenes[0][2])
    first.write_bytes(b"0 0.5 0.5 0.2 0.2 # caf\xe9\n")
    with pytest.raises(KdError, match="scene_000.txt is not UTF-8 text"):
        yolo_boxes(str(tmp_path), "train", names)  # (a str root as well as a Path)
    first.write_text("0 0.5 0.5 0.2 1_0\n")
    with pytest.raises(KdError, match="is not `class cx cy w h` .numbers."):
        yolo_boxes(tmp_path, "train", names)
    first.unlink()
    (tmp_path / "images" / "train" / "scene_000.png").write_bytes(b"not an image")
    with pytest.raises(KdError, match="scene_000.png cannot be read as an image"):
        yolo_boxes(tmp_path, "train", names)
    assert len(yolo_boxes(tmp_path, "train", names, skip_bad=True).records) == 2


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda root: (root / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n"), "ghost.txt"),
        (lambda root: shutil.rmtree(root / "labels"), "YOLO labels"),
        (lambda root: Image.new("L", (48, 48)).save(root / "images" / "train" / "scene_000.jpg"), "share the label"),
    ],
)
def test_a_yolo_folder_whose_labels_do_not_pair_with_its_images_is_refused(tmp_path, change, fragment):
    scenes = write_scene_images(tmp_path / "images" / "train", 2)
    yolo_folder(tmp_path, scenes)
    change(tmp_path)
    with pytest.raises(KdError, match=re.escape(fragment)):
        yolo_boxes(tmp_path, "train", ["a"] * 10)
    with pytest.raises(KdError, match="needs its class names"):
        yolo_boxes(tmp_path, "train", [])


def edit_coco(document: dict, change: str) -> None:
    image, annotation, category = document["images"][1], document["annotations"][0], document["categories"][0]
    if change == "no size":
        del image["width"]
    elif change == "size lies":
        image["width"] = 480
    elif change == "crowd as text":
        annotation["iscrowd"] = "false"
    elif change == "category twice":
        document["categories"].append({**category, "name": "again"})
    elif change == "image twice":
        document["images"].append(dict(image))
    elif change == "stray annotation":
        document["annotations"].append({**annotation, "id": 4242, "image_id": 77})
    elif change == "category without name":
        del category["name"]
    elif change == "category id as text":
        category["id"] = str(category["id"])


@pytest.mark.parametrize(
    "change, fragment",
    [
        ("no size", "'width' and 'height' must be whole numbers"),
        ("size lies", "the file lists 480x48 but"),
        ("crowd as text", "'iscrowd' must be 0 or 1"),
        ("category twice", "category id 1 is listed 2 times"),
        ("image twice", "image id 101 is listed 2 times"),
        ("stray annotation", "annotation 4242 names an image_id not in 'images'"),
        ("category without name", "has no 'name'"),
        ("category id as text", "needs an integer 'id'"),
    ],
)
def test_a_coco_file_pycocotools_would_misread_is_one_line(tmp_path, change, fragment):
    scenes = write_scene_images(tmp_path / "images", 3)
    path = coco_file(tmp_path, scenes)
    document = json.loads(path.read_text())
    edit_coco(document, change)
    path.write_text(json.dumps(document))
    with pytest.raises(KdError) as refused:
        coco_boxes(path, tmp_path / "images")
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_voc_sizes_written_as_decimals_and_difficult_as_true(tmp_path):
    scenes = write_scene_images(tmp_path / "scenes", 2)
    folder = voc_tree(tmp_path, scenes)
    xml = folder / "Annotations" / "scene_000.xml"
    text = xml.read_text().replace("<width>48</width>", "<width>48.0</width>")
    xml.write_text(text.replace("<difficult>0</difficult>", "<difficult>true</difficult>"))
    record = voc_boxes(str(tmp_path), "2007", "trainval").records[0]
    assert record.width == 48 and record.crowd.all()
    xml.write_text(text.replace("<width>48.0</width>", "<width>0</width>"))
    with pytest.raises(KdError, match="<size> 0x48 is not a size in whole pixels"):
        voc_boxes(str(tmp_path), "2007", "trainval")


# --- the registered data sets: each layout written here, read through kd's loader --------------------


def test_coco_detection_letterboxes_keeps_ids_with_gaps_and_crowds_only_for_scoring(tmp_path):
    from kd_cli.data.base import BoxSplit

    for split, count in (("train", 6), ("test", 4)):
        scenes = write_scene_images(tmp_path / split / "images", count)  # (the test scenes: the first training ones)
        crowd = {"id": 7777, "image_id": 100, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100.0, "iscrowd": 1}
        coco_file(tmp_path / split, scenes, extra_annotation=crowd)
    data = load_dataset(
        {
            "name": "coco_detection",
            "root": str(tmp_path),
            "train_annotations": "train/instances.json",
            "train_images": "train/images",
            "test_annotations": "test/instances.json",
            "test_images": "test/images",
            "image_size": 64,
        }
    )
    assert data.task == "detection" and data.category_ids == GAPPY and data.class_names[3] == "digit 3"
    assert isinstance(data.train, BoxSplit) and data.train.images.shape == (7, 3, 64, 64)  # the empty image kept
    assert data.train.image_ids == [100, 101, 102, 103, 104, 105, 999]
    written = coco_boxes(tmp_path / "train" / "instances.json", tmp_path / "train" / "images")
    first = written.records[0]
    assert torch.allclose(data.train.boxes[0], first.boxes[~first.crowd] * 64 / 48)  # crowd not trained on
    assert data.test.crowds is not None and bool(data.test.crowds[0].any())  # ... but kept for COCOeval
    assert data.test.scales[0] == pytest.approx(64 / 48) and data.test.sizes[0] == (48, 48)


def test_yolo_detection_reads_data_yaml_names_as_a_list_or_a_map(tmp_path):
    for split, count in (("train", 5), ("val", 3)):
        yolo_folder(tmp_path, write_scene_images(tmp_path / "images" / split, count), split)
    (tmp_path / "data.yaml").write_text("names:\n" + "".join(f"  {d}: n{d}\n" for d in range(10)))
    data = load_dataset({"name": "yolo_detection", "root": str(tmp_path), "image_size": 48})
    assert data.class_names == [f"n{d}" for d in range(10)] and len(data.train) == 5 and len(data.test) == 3
    read = yolo_boxes(tmp_path, "train", data.class_names)
    assert torch.allclose(data.train.boxes[0], read.records[0].boxes, atol=1e-3)
    (tmp_path / "data.yaml").write_text("names: {0: a, 2: b}\n")
    with pytest.raises(KdError, match="data.yaml has no usable `names`"):
        load_dataset({"name": "yolo_detection", "root": str(tmp_path)})
    (tmp_path / "data.yaml").unlink()
    with pytest.raises(KdError, match="data.yaml not found.*dataset.class_names"):
        load_dataset({"name": "yolo_detection", "root": str(tmp_path)})


def test_voc_detection_reads_train_and_test_lists_difficult_left_out_of_training(tmp_path):
    scenes = write_scene_images(tmp_path / "scenes", 3)
    voc_tree(tmp_path, scenes, year="2012", image_set="train")
    voc_tree(tmp_path, scenes[:2], year="2012", image_set="val")
    data = load_dataset({"name": "voc_detection", "root": str(tmp_path), "image_size": 48})
    assert data.class_names[:10] == VOC_NAMES and len(data.train) == 3 and len(data.test) == 2
    assert [len(b) for b in data.train.boxes] == [len(s[1]) - 1 for s in scenes]  # the difficult box left out
    assert [int(c.sum()) for c in data.test.crowds] == [1, 1]


def test_a_coco_layout_trains_and_its_results_file_has_the_files_own_ids(tmp_path):
    from kdrun import FAST, kd_here_ok, summary

    for split, count in (("train", 8), ("test", 4)):
        coco_file(tmp_path / split, write_scene_images(tmp_path / split / "images", count))
    data = [
        "dataset=coco_detection",
        f"dataset.root={tmp_path}",
        "dataset.train_annotations=train/instances.json",
        "dataset.train_images=train/images",
        "dataset.test_annotations=test/instances.json",
        "dataset.test_images=test/images",
        "dataset.image_size=48",
        *FAST,
    ]
    teacher = tmp_path / "teacher"
    kd_here_ok(
        "train-teacher",
        *data,
        "trainer.epochs=1",
        "trainer.batch_size=4",
        "teacher.kwargs.width=8",
        "teacher.kwargs.score_thresh=0.0",
        f"hydra.run.dir={teacher}",
        cwd=tmp_path,
    )
    assert summary(teacher)["status"] == "complete"
    kd_here_ok("evaluate", f"run={teacher}", *FAST, f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    detections = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= set(GAPPY)
    assert {d["image_id"] for d in detections} <= {100, 101, 102, 103, 999}


# --- a second fuzzing pass: each was a silent misreading or a message that did not say what to fix ---------


def two_split_yolo_folder(root: Path) -> None:
    for split, count in (("train", 3), ("val", 2)):
        yolo_folder(root, write_scene_images(root / "images" / split, count), split)


@pytest.mark.parametrize(
    "names, fragment",
    [
        ("names: [cat, cat, dog]\n", "data.yaml: `names` lists 'cat' more than once"),
        ("names: {0: cat, 1: dog, 2: cat, 3: dog}\n", "data.yaml: `names` lists 'cat', 'dog' more than once"),
        ("names: [1, '1']\n", "data.yaml: `names` lists '1' more than once"),  # (both are the class name "1")
    ],
)
def test_yolo_class_names_listed_twice_in_data_yaml_are_refused(tmp_path, names, fragment):
    two_split_yolo_folder(tmp_path)
    (tmp_path / "data.yaml").write_text(names)
    with pytest.raises(KdError, match=re.escape(fragment) + ".*give each class its own name"):
        load_dataset({"name": "yolo_detection", "root": str(tmp_path)})


def test_yolo_class_names_option_listing_a_name_twice_is_refused(tmp_path):
    two_split_yolo_folder(tmp_path)
    names = [f"n{d}" for d in range(9)] + ["n3"]
    with pytest.raises(KdError, match=r"^dataset.class_names lists 'n3' more than once; give each class its own name$"):
        load_dataset({"name": "yolo_detection", "root": str(tmp_path), "class_names": names})


def test_coco_categories_sharing_a_name_are_refused(tmp_path):
    scenes = write_scene_images(tmp_path / "images", 2)
    path = coco_file(tmp_path, scenes)
    document = json.loads(path.read_text())
    document["categories"][1]["name"] = "digit 0"  # id 2, as id 1
    path.write_text(json.dumps(document))
    with pytest.raises(
        KdError, match=r"^instances.json: categories share a name: 'digit 0' \(ids 1, 2\); give each category its"
    ):
        coco_boxes(path, tmp_path / "images")


def test_coco_train_and_test_categories_that_differ_are_named(tmp_path):
    ids = {"train": GAPPY, "test": [*GAPPY[:-1], 90]}  # the test file numbers digit 9 as 90
    for split in ("train", "test"):
        coco_file(tmp_path / split, write_scene_images(tmp_path / split / "images", 2), ids=ids[split])
    document = json.loads((tmp_path / "test" / "instances.json").read_text())
    document["categories"][0]["name"] = "zero"  # and calls digit 0 zero
    (tmp_path / "test" / "instances.json").write_text(json.dumps(document))
    options = {
        f"{split}_{what}": f"{split}/{kind}"
        for split in ("train", "test")
        for what, kind in (("annotations", "instances.json"), ("images", "images"))
    }
    fragment = "only in the training file: 1: digit 0, 89: digit 9; only in the test file: 1: zero, 90: digit 9"
    with pytest.raises(KdError, match=re.escape(fragment) + "\\); give files of one category list$"):
        load_dataset({"name": "coco_detection", "root": str(tmp_path), **options})


def test_yolo_detection_refuses_an_explicitly_empty_class_names_list(tmp_path):
    two_split_yolo_folder(tmp_path)
    (tmp_path / "data.yaml").write_text("names: [" + ", ".join(f"n{d}" for d in range(10)) + "]\n")
    with pytest.raises(
        KdError, match=r"^dataset.class_names=\[\] lists no class; .*or leave it out to read data.yaml$"
    ):
        load_dataset({"name": "yolo_detection", "root": str(tmp_path), "class_names": []})
    data = load_dataset({"name": "yolo_detection", "root": str(tmp_path), "class_names": None, "image_size": 48})
    assert data.class_names == [f"n{d}" for d in range(10)]  # null, as left out, reads data.yaml


@pytest.mark.parametrize("class_names", [None, ["a", "b"]])
def test_a_missing_yolo_root_is_named_as_the_folder_not_as_its_data_yaml(tmp_path, class_names):
    missing = tmp_path / "nowhere"
    expected = r"YOLO folder .*nowhere not found \(expected images/<split>/, labels/<split>/ and data.yaml in it\)"
    with pytest.raises(KdError, match=expected + "; give its path as dataset.root$"):
        load_dataset({"name": "yolo_detection", "root": str(missing), "class_names": class_names})
    with pytest.raises(KdError, match=expected):
        yolo_boxes(missing, "train", ["a"])
    missing.write_text("a file")
    with pytest.raises(KdError, match="YOLO folder .*nowhere is a file, not a folder"):
        yolo_boxes(missing, "train", ["a"])


@pytest.mark.parametrize(
    "bbox, fragment",
    [
        ([10, 10, -5, 4], "annotation 777: bbox [10, 10, -5, 4] has no area"),
        ([40, 40, 20, 20], "annotation 777: bbox [40, 40, 20, 20] lies outside the 48x48 image"),
        ([46.5, 10, 3.5, 4], "annotation 777: bbox [46.5, 10, 3.5, 4] lies outside"),  # (x2 = 50, not 3.5)
    ],
)
def test_a_bad_coco_box_is_quoted_as_its_bbox_is_written(tmp_path, bbox, fragment):
    scenes = write_scene_images(tmp_path / "images", 2)
    annotation = {"id": 777, "image_id": 101, "category_id": 1, "bbox": bbox, "iscrowd": 0}
    path = coco_file(tmp_path, scenes, extra_annotation=annotation)
    with pytest.raises(KdError, match=re.escape(fragment)):
        coco_boxes(path, tmp_path / "images")


def test_a_fractional_yolo_class_index_is_said_to_be_one_not_a_row_of_non_numbers(tmp_path):
    scenes = write_scene_images(tmp_path / "images" / "train", 2)
    yolo_folder(tmp_path, scenes)
    names = [str(d) for d in range(10)]
    labels = tmp_path / "labels" / "train" / "scene_000.txt"
    labels.write_text("1.0 0.5 0.5 0.2 0.2\n")  # a whole number written as a float: class 1, as Ultralytics reads it
    assert yolo_boxes(tmp_path, "train", names).records[0].labels.tolist() == [1]
    labels.write_text("1.0 0.5 0.5 0.2 0.2\n1.5 0.5 0.5 0.2 0.2\n")
    with pytest.raises(
        KdError, match=r"scene_000.txt:2: class index 1.5 must be a whole number 0..9 \(the first column\)"
    ):
        yolo_boxes(tmp_path, "train", names)
