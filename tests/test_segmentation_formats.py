"""Segmentation data sets in their real on-disk layouts, written by the test from scenes of real digits
(scikit-learn's, composed as `digit_scenes` composes them) and read back by kd's loaders through the
libraries' own readers: Cityscapes (torchvision's Cityscapes, labelIds mapped to train ids), ADE20K's
scene-parsing folders (0 ignored, v -> v - 1), and COCO instance JSON (pycocotools, RLE and polygons,
category ids with gaps, crowds). What comes back equals what was written, pixel for pixel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from kdrun import FAST, assert_one_line_error, kd_here, kd_here_ok, run_dirs, summary

from kd_cli.data import load_dataset
from kd_cli.data.ade20k import ADE20K_CLASSES
from kd_cli.data.cityscapes import train_id_table
from kd_cli.errors import KdError
from kd_cli.tasks import IGNORE_INDEX

SIDE = 32


@pytest.fixture(scope="module")
def scenes():
    """Eight RGB scenes of real digits (uint8 (N, H, W, 3)) and their masks (background 0, digit d = d + 1)."""
    data = load_dataset({"name": "digit_scenes", "train_scenes": 8, "test_scenes": 2, "canvas": SIDE})
    grey = data.train.images[:, 0].numpy()
    return np.stack([grey, 255 - grey, grey], axis=-1).astype(np.uint8), data.train.labels.numpy().astype(np.int64)


def save_png(path, array, mode=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode=mode).save(path)


def loaded(options):
    data = load_dataset({**options, "image_size": SIDE})
    assert data.task == "segmentation"
    return data


# --- Cityscapes -------------------------------------------------------------------------------------------


def write_cityscapes(root, images, masks):
    """leftImg8bit/ + gtFine/ as torchvision's Cityscapes lists them; class k stored as the label id whose
    train id is k, and a band of 'ego vehicle' (id 1, not scored) along each image's bottom."""
    table, _ = train_id_table()
    label_id = {int(train): int(np.flatnonzero(table == train)[0]) for train in range(11)}
    for i, (image, mask) in enumerate(zip(images, masks)):
        split, city = ("train", "aachen") if i < 6 else ("val", "lindau")
        stem = f"{city}_{i:06d}_000019"
        ids = np.vectorize(label_id.get)(mask)
        ids[-2:] = 1
        save_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
        save_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)


def test_cityscapes_label_ids_become_the_19_train_ids(tmp_path, scenes):
    images, masks = scenes
    write_cityscapes(tmp_path, images, masks)
    data = loaded({"name": "cityscapes", "root": str(tmp_path)})
    assert data.num_classes == 19 and data.class_names[:3] == ["road", "sidewalk", "building"]
    assert data.class_names[-1] == "bicycle" and len(data.train) == 6 and len(data.test) == 2
    expected = torch.from_numpy(masks[:6]).to(torch.uint8)
    expected[:, -2:] = IGNORE_INDEX  # ego vehicle: not one of the 19
    assert torch.equal(data.train.labels, expected)
    assert torch.equal(data.train.images, torch.from_numpy(images[:6]).permute(0, 3, 1, 2))


def test_cityscapes_refuses_a_trainids_or_color_mask_and_a_missing_folder(tmp_path, scenes):
    images, masks = scenes
    write_cityscapes(tmp_path, images, masks)
    bad = next((tmp_path / "gtFine" / "train" / "aachen").iterdir())
    save_png(bad, np.full((SIDE, SIDE), 40))
    with pytest.raises(KdError, match=r"holds value 40, not a Cityscapes label id .*labelIds"):
        loaded({"name": "cityscapes", "root": str(tmp_path)})
    skipped = loaded({"name": "cityscapes", "root": str(tmp_path), "skip_bad_masks": True})
    assert len(skipped.train) == 5
    result = kd_here("train-teacher", "dataset=cityscapes", f"dataset.root={tmp_path / 'none'}", *FAST, cwd=tmp_path)
    assert_one_line_error(result, "Cityscapes train not found under", "leftImg8bit/train/")


# --- ADE20K -----------------------------------------------------------------------------------------------


def write_ade20k(root, images, masks):
    """ADEChallengeData2016/images/*.jpg + annotations/*.png; class k stored as k + 1, a row of 0 ('other')."""
    from PIL import Image

    top = root / "ADEChallengeData2016"
    for i, (image, mask) in enumerate(zip(images, masks)):
        split, name = ("training", f"ADE_train_{i + 1:08d}") if i < 6 else ("validation", f"ADE_val_{i - 5:08d}")
        (top / "images" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(top / "images" / split / f"{name}.jpg", quality=95)
        stored = mask + 1
        stored[0] = 0
        save_png(top / "annotations" / split / f"{name}.png", stored)
    return top


def test_ade20k_shifts_its_classes_and_ignores_other(tmp_path, scenes):
    images, masks = scenes
    write_ade20k(tmp_path, images, masks)
    data = loaded({"name": "ade20k", "root": str(tmp_path)})
    assert data.num_classes == 150 == len(set(ADE20K_CLASSES)) and data.class_names[0] == "wall"
    expected = torch.from_numpy(masks[6:]).to(torch.uint8)
    expected[:, 0] = IGNORE_INDEX
    assert torch.equal(data.test.labels, expected) and len(data.train) == 6
    jpeg_error = (data.test.images.float() - torch.from_numpy(images[6:]).permute(0, 3, 1, 2).float()).abs().mean()
    assert jpeg_error < 8


def test_ade20k_refuses_a_value_beyond_150_and_explains_a_missing_download(tmp_path, scenes):
    images, masks = scenes
    top = write_ade20k(tmp_path, images, masks)
    save_png(top / "annotations" / "training" / "ADE_train_00000002.png", np.full((SIDE, SIDE), 151))
    with pytest.raises(KdError, match=r"ADE_train_00000002.png holds value 151; .* 0 \(unlabelled\) to 150"):
        loaded({"name": "ade20k", "root": str(tmp_path)})
    with pytest.raises(KdError, match=r"ADE20K not found under .*dataset.download=true"):
        loaded({"name": "ade20k", "root": str(tmp_path / "elsewhere")})


# --- COCO -------------------------------------------------------------------------------------------------


def rle_of(region: np.ndarray) -> dict:
    from pycocotools import mask as rle

    encoded = rle.encode(np.asfortranarray(region.astype(np.uint8)))
    return {**encoded, "counts": encoded["counts"].decode()}  # as COCO's JSON stores compressed RLE


def add_annotation(annotations: list, image_id: int, category: int, segmentation, crowd: int = 0) -> None:
    entry = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "iscrowd": crowd}
    annotations.append({**entry, "segmentation": segmentation, "area": 1, "bbox": [0, 0, 1, 1]})


def coco_file(masks, first_id: int, crowd: bool = False) -> dict:
    """COCO instance JSON: one RLE annotation per class present in each scene (category id 3 + 2 * class:
    ids with gaps), a polygon for the first scene's background corner, an optional crowd region."""
    listing: list[dict] = []
    annotations: list[dict] = []
    categories = [{"id": 3 + 2 * k, "name": f"digit {k - 1}" if k else "corner"} for k in range(11)]
    for n, mask in enumerate(masks):
        listing.append({"id": first_id + n, "file_name": f"{first_id + n:012d}.jpg", "height": SIDE, "width": SIDE})
        for k in sorted(set(np.unique(mask).tolist()) - {0}):
            add_annotation(annotations, first_id + n, 3 + 2 * k, rle_of(mask == k))
    add_annotation(annotations, first_id, 3, [[0, 0, 4, 0, 4, 4, 0, 4]])  # a 4x4 square at the top left
    if crowd:
        region = np.zeros((SIDE, SIDE), dtype=bool)
        region[-3:, :] = True
        add_annotation(annotations, first_id + 1, 5, rle_of(region), crowd=1)
    return {"images": listing, "annotations": annotations, "categories": categories}


def write_coco(root, images, masks):
    from PIL import Image

    (root / "annotations").mkdir(parents=True)
    for split, part, first in (("train", slice(0, 6), 100), ("val", slice(6, 8), 500)):
        (root / f"{split}2017").mkdir()
        for n, image in enumerate(images[part]):
            Image.fromarray(image).save(root / f"{split}2017" / f"{first + n:012d}.jpg", quality=95)
        content = coco_file(masks[part], first, crowd=split == "train")
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(content))


def test_coco_instances_become_semantic_masks_with_contiguous_classes(tmp_path, scenes):
    pytest.importorskip("pycocotools")
    images, masks = scenes
    write_coco(tmp_path, images, masks)
    data = loaded({"name": "coco_segmentation", "root": str(tmp_path)})
    assert data.class_names == ["background", "corner", *(f"digit {d}" for d in range(10))]
    expected = torch.from_numpy(masks[:6] + 1).to(torch.uint8)  # class k is category 3 + 2k, index k + 1
    expected[masks[:6] == 0] = 0
    expected[0, :4, :4] = torch.where(expected[0, :4, :4] == 0, 1, IGNORE_INDEX)  # the corner; overlaps ignored
    expected[1, -3:, :] = IGNORE_INDEX  # the crowd
    assert torch.equal(data.train.labels, expected)
    chosen = loaded(
        {
            "name": "coco_segmentation",
            "root": str(tmp_path),
            "categories": ["digit 3", "digit 7"],
            "annotated_only": True,
        }
    )
    assert chosen.class_names == ["background", "digit 3", "digit 7"]
    assert set(chosen.train.labels.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
    assert all(((labels == 1) | (labels == 2)).any() for labels in chosen.train.labels)
    capped = loaded({"name": "coco_segmentation", "root": str(tmp_path), "categories": ["corner"], "max_images": 1})
    assert len(capped.train) == len(capped.test) == 1 and capped.train.labels[0, 0, 0] == 1


def test_coco_bad_files_are_one_line(tmp_path, scenes):
    pytest.importorskip("pycocotools")
    images, masks = scenes
    write_coco(tmp_path, images, masks)
    with pytest.raises(KdError, match=r"dataset.categories: zebra not in instances_train2017.json"):
        loaded({"name": "coco_segmentation", "root": str(tmp_path), "categories": ["zebra"]})
    path = tmp_path / "annotations" / "instances_train2017.json"
    content = json.loads(path.read_text())
    content["images"].append({**content["images"][0], "id": 106})  # a seventh image, its one object of no category
    content["annotations"].append({**content["annotations"][0], "id": 999, "image_id": 106, "category_id": 99})
    path.write_text(json.dumps(content))
    with pytest.raises(KdError, match=r"image id 106\): annotation 999 has category_id 99, not in 'categories'"):
        loaded({"name": "coco_segmentation", "root": str(tmp_path)})
    assert len(loaded({"name": "coco_segmentation", "root": str(tmp_path), "skip_bad_masks": True}).train) == 6
    path.write_text('{"images": [')
    result = kd_here("train-teacher", "dataset=coco_segmentation", f"dataset.root={tmp_path}", *FAST, cwd=tmp_path)
    assert_one_line_error(result, "instances_train2017.json cannot be read", "COCO JSON")


# --- streamed from disk (dataset.stream=true) -------------------------------------------------------------


@pytest.fixture(scope="module")
def more_scenes():
    """40 scenes of real digits as RGB arrays and masks: enough that every digit is in the training part."""
    data = load_dataset({"name": "digit_scenes", "train_scenes": 40, "test_scenes": 2, "canvas": SIDE})
    grey = data.train.images[:, 0].numpy()
    return np.stack([grey, 255 - grey, grey], axis=-1).astype(np.uint8), data.train.labels.numpy().astype(np.int64)


def write_scene_folder(root, images, masks, widths=(32, 48, 40)):
    """seg_folder's layout with images of different widths (scenes padded on the right with background)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (image, mask) in enumerate(zip(images, masks)):
        width = widths[i % len(widths)]
        wide_image = np.zeros((SIDE, width, 3), dtype=np.uint8)
        wide_mask = np.zeros((SIDE, width), dtype=np.uint8)
        wide_image[:, :SIDE], wide_mask[:, :SIDE] = image, mask
        Image.fromarray(wide_image).save(root / "images" / f"scene{i}.png")
        save_png(root / "masks" / f"scene{i}.png", wide_mask)
    (root / "classes.txt").write_text("\n".join(["background", *(f"digit {d}" for d in range(10))]) + "\n")


def test_a_streamed_split_crops_for_training_and_scores_whole_images(tmp_path, more_scenes):
    from kd_cli.data.augment import Augmentation
    from kd_cli.data.base import FolderSplit
    from kd_cli.data.loader import make_loader

    images, masks = more_scenes
    write_scene_folder(tmp_path / "mine", images, masks)
    options = {"name": "seg_folder", "root": str(tmp_path / "mine"), "test_fraction": 0.25, "stream": True}
    data = load_dataset({**options, "image_size": 24})
    assert isinstance(data.train, FolderSplit) and data.task == "segmentation" and data.input_size == 24
    common = dict(mean=[0.5] * 3, std=[0.5] * 3, device=torch.device("cpu"), seed=0, num_workers=0)
    spec = Augmentation(crop_padding=4, hflip=True)
    train = make_loader(data.train, batch_size=3, train=True, spec=spec, **common)
    crops, crop_masks = next(iter(train))
    assert crops.shape == (3, 3, 24, 24) and crops.dtype == torch.float32 and crop_masks.shape == (3, 24, 24)
    assert crop_masks.dtype == torch.int64 and set(crop_masks.unique().tolist()) <= {*range(11), IGNORE_INDEX}
    test = make_loader(data.test, batch_size=8, train=False, spec=None, **common)
    shapes = [(tuple(image.shape), tuple(mask.shape)) for image, mask in test]
    assert len(shapes) == len(data.test)  # one image per batch, whole
    stored = {(SIDE, width) for width in (32, 48, 40)}
    assert all(image[2:] == mask[1:] and mask[1:] in stored for image, mask in shapes)


def test_a_streamed_segmenter_is_scored_at_each_masks_full_resolution(tmp_path, more_scenes):
    """kd evaluate's mIoU on a streamed test split equals torchmetrics' over the stored masks, each image
    run whole through the model."""
    torchmetrics = pytest.importorskip("torchmetrics")
    from PIL import Image

    from kd_cli.engine.artifacts import load_model

    images, masks = more_scenes
    write_scene_folder(tmp_path / "mine", images, masks)
    setting = [
        "dataset=seg_folder",
        f"dataset.root={tmp_path / 'mine'}",
        "dataset.stream=true",
        "dataset.image_size=24",
        "dataset.test_fraction=0.25",
        "teacher.arch=segcnn_tiny",
        "trainer.epochs=1",
        "trainer.batch_size=4",
        *FAST,
    ]
    kd_here_ok("train-teacher", *setting, cwd=tmp_path)
    (run,) = run_dirs(tmp_path / "outputs", "train-teacher")
    kd_here_ok("evaluate", f"run={run}", "latency_batches=1", *FAST, cwd=tmp_path)
    (evaluation,) = run_dirs(tmp_path / "outputs", "evaluate")
    model, spec = load_model(run)
    metric = torchmetrics.classification.MulticlassJaccardIndex(11, ignore_index=IGNORE_INDEX, average="macro")
    data = load_dataset({"name": "seg_folder", "root": str(tmp_path / "mine"), "test_fraction": 0.25, "stream": True})
    for image_path, mask_path in data.test.dataset.pairs:
        pixels = torch.from_numpy(np.array(Image.open(image_path))).permute(2, 0, 1).float() / 255
        pixels = (pixels - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
        with torch.no_grad():
            prediction = model.eval()(pixels[None]).argmax(1)
        metric.update(prediction, torch.from_numpy(np.array(Image.open(mask_path))).long()[None])
    assert summary(evaluation)["miou"] == pytest.approx(100 * float(metric.compute()), abs=1e-3)


def test_a_bad_mask_is_found_before_streaming_starts(tmp_path, more_scenes):
    images, masks = more_scenes
    write_scene_folder(tmp_path / "mine", images, masks)
    save_png(tmp_path / "mine" / "masks" / "scene2.png", np.zeros((SIDE, 33)))
    options = {"name": "seg_folder", "root": str(tmp_path / "mine"), "stream": True, "image_size": 24}
    with pytest.raises(KdError, match=r"scene2.png is 33x32 but its image is 40x32.*skip_bad_masks=true"):
        load_dataset(options)
    kept = load_dataset({**options, "skip_bad_masks": True})
    assert len(kept.train) + len(kept.test) == len(images) - 1
