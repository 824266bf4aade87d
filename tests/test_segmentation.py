"""Semantic segmentation on the task axis: the digit scenes, joint augmentation of image and mask, mIoU
against torchmetrics, the pixel-wise KD and CWD losses against float64 references written from the
authors' code (CIRKD's CriterionKD, mmrazor's ChannelWiseDivergence), refusals of another task's models
and methods, and kd distill / evaluate end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kdrun import FAST, assert_one_line_error, kd_here, kd_here_ok, run_dirs, summary

from kd_cli.data import load_dataset
from kd_cli.data.augment import Augmentation, augment_pair
from kd_cli.data.base import DataSplits, TensorSplit
from kd_cli.data.checks import check_splits
from kd_cli.data.scenes import INK, compose_scenes
from kd_cli.errors import KdError
from kd_cli.methods.cwd import cwd_loss
from kd_cli.methods.pixel_kd import pixel_kd_loss
from kd_cli.models import list_models, model_task
from kd_cli.tasks import IGNORE_INDEX, get_task

# Small scenes: what the CLI tests train on (a few seconds each).
SCENES = [
    "dataset=digit_scenes",
    "dataset.train_scenes=64",
    "dataset.test_scenes=32",
    "dataset.canvas=24",
    "dataset.digits_per_scene=2",
    "trainer.batch_size=16",
    "trainer.epochs=1",
    *FAST,
]


# --- data ---------------------------------------------------------------------------------------------


def test_scene_masks_label_each_digits_ink_and_nothing_else():
    digits = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    digits[0, 0, 1:3, 1:3] = 200  # a 2x2 blob of ink
    digits[1, 0, 0, :] = 255
    digits[1, 0, 1, :] = INK - 1  # too faint to be the digit's: background
    images, masks = compose_scenes(digits, torch.tensor([3, 7]), count=50, canvas=12, per_scene=2, seed=1)
    assert images.shape == (50, 1, 12, 12) and masks.shape == (50, 12, 12) and masks.dtype == torch.uint8
    assert set(masks.unique().tolist()) <= {0, 4, 8}  # digit d is class d + 1
    assert ((masks > 0) <= (images[:, 0] >= INK)).all()  # a labelled pixel has ink
    assert (masks == 8).any() and (images[:, 0][masks == 0] == INK - 1).any()  # a faint row stays background
    again = compose_scenes(digits, torch.tensor([3, 7]), count=50, canvas=12, per_scene=2, seed=1)
    assert torch.equal(again[0], images) and torch.equal(again[1], masks)
    other = compose_scenes(digits, torch.tensor([3, 7]), count=50, canvas=12, per_scene=2, seed=2)
    assert not torch.equal(other[1], masks)


def test_digit_scenes_is_a_segmentation_set_of_real_digits():
    data = load_dataset({"name": "digit_scenes", "train_scenes": 40, "test_scenes": 20})
    assert data.task == "segmentation" and data.num_classes == 11 and data.class_names[0] == "background"
    assert data.train.images.shape == (40, 1, 48, 48) and data.train.labels.shape == (40, 48, 48)
    assert data.train.labels.max() <= 10 and len(data.train.labels.unique()) > 5
    again = load_dataset({"name": "digit_scenes", "train_scenes": 40, "test_scenes": 20})
    assert again.fingerprint == data.fingerprint
    other = load_dataset({"name": "digit_scenes", "train_scenes": 40, "test_scenes": 20, "scene_seed": 1})
    assert other.fingerprint != data.fingerprint


def test_joint_augmentation_moves_the_mask_with_the_image():
    generator = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 10, (16, 12, 12), dtype=torch.uint8)
    images = (masks * 20 + 10)[:, None]  # each pixel's value names its label
    out, moved = augment_pair(images, masks, Augmentation(crop_padding=3, hflip=True), generator)
    inside = moved != IGNORE_INDEX
    assert torch.allclose(out[:, 0][inside] * 255, (moved[inside].float() * 20 + 10), atol=1e-3)
    assert (out[:, 0][~inside] == 0).all()  # what the crop brought in is black in the image, ignored in the mask
    assert (~inside).any() and inside.float().mean() > 0.5
    flipped = not torch.equal(moved[inside], masks[inside])
    assert flipped


def test_rotation_ignores_the_corners_it_brings_in():
    generator = torch.Generator().manual_seed(0)
    masks = torch.ones(4, 16, 16, dtype=torch.uint8)
    _, moved = augment_pair(masks[:, None] * 100, masks, Augmentation(rotate_degrees=45), generator)
    assert set(moved.unique().tolist()) <= {1, IGNORE_INDEX} and (moved == IGNORE_INDEX).any()


def test_a_mask_value_outside_the_classes_is_one_line():
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    masks = torch.zeros(4, 8, 8, dtype=torch.uint8)
    masks[:, :4] = 1
    good = TensorSplit(images, masks)
    bad = TensorSplit(images, masks.clone())
    bad.labels[0, 0, 0] = 7
    data = DataSplits(good, bad, 3, ["bg", "a", "b"], 1, 8, "x", task="segmentation")
    try:
        check_splits(data, "mine")
        raise AssertionError("accepted a mask value of 7 with 3 classes")
    except KdError as error:
        assert "test masks hold value 7" in str(error) and "255 (ignored)" in str(error)
    one_class = DataSplits(TensorSplit(images, torch.zeros_like(masks)), good, 3, ["bg", "a", "b"], 1, 8, "x")
    one_class.task = "segmentation"
    try:
        check_splits(one_class, "mine")
        raise AssertionError("accepted training masks of one class")
    except KdError as error:
        assert "at least 2 classes" in str(error)


# --- metric -------------------------------------------------------------------------------------------


def test_miou_equals_torchmetrics_over_a_split_with_ignored_pixels():
    from torchmetrics.classification import MulticlassJaccardIndex

    generator = torch.Generator().manual_seed(0)
    classes = 6
    score = get_task("segmentation").new_score(classes)
    reference = MulticlassJaccardIndex(num_classes=classes, average="macro", ignore_index=IGNORE_INDEX)
    for _ in range(5):
        masks = torch.randint(0, classes - 1, (3, 10, 10), generator=generator)  # class 5 never in the labels
        masks[:, 0] = IGNORE_INDEX
        logits = torch.randn(3, classes, 10, 10, generator=generator)
        logits[:, 5] -= 10  # ... nor (almost) in the predictions
        score.update(logits, masks)
        reference.update(logits.argmax(1), masks)
    result = score.result()
    assert abs(result["miou"] - 100 * reference.compute().item()) < 1e-4
    assert 0 < result["pixel_acc"] < 100


def test_miou_at_the_labels_resolution_and_absent_classes_left_out():
    score = get_task("segmentation").new_score(4)
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, :, 4:] = 1
    logits = torch.zeros(1, 4, 4, 4)  # half the label's size: resized before scoring
    logits[0, 0, :, :2] = 5
    logits[0, 1, :, 2:] = 5
    report = score.update(logits, masks) or score.report()
    assert report["miou"] == 100.0 and report["pixel_acc"] == 100.0
    assert report["per_class_iou"][:2] == [100.0, 100.0] and all(v != v for v in report["per_class_iou"][2:])


# --- losses against the authors' formulas, in float64 ----------------------------------------------------


def cirkd_criterion_kd(pred: torch.Tensor, soft: torch.Tensor, temperature: float) -> torch.Tensor:
    """CIRKD's CriterionKD (losses/kd.py): every pixel a row, KL with batchmean, times T^2."""
    b, c, h, w = soft.size()
    scale_pred = pred.permute(0, 2, 3, 1).contiguous().view(-1, c)
    scale_soft = soft.permute(0, 2, 3, 1).contiguous().view(-1, c)
    p_s = F.log_softmax(scale_pred / temperature, dim=1)
    p_t = F.softmax(scale_soft / temperature, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * temperature**2


def mmrazor_channel_wise_divergence(preds_s: torch.Tensor, preds_t: torch.Tensor, tau: float) -> torch.Tensor:
    """mmrazor's ChannelWiseDivergence.forward (loss_weight 1), as its authors wrote it."""
    n, c, h, w = preds_s.shape
    softmax_pred_t = F.softmax(preds_t.reshape(-1, w * h) / tau, dim=1)
    logsoftmax = torch.nn.LogSoftmax(dim=1)
    loss = torch.sum(
        softmax_pred_t * logsoftmax(preds_t.reshape(-1, w * h) / tau)
        - softmax_pred_t * logsoftmax(preds_s.reshape(-1, w * h) / tau)
    ) * (tau**2)
    return loss / (c * n)


def _pair(seed: int, shape=(2, 5, 6, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))  # type: ignore[return-value]


def _grad(fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    student = student.clone().requires_grad_(True)
    value = fn(student)
    value.backward()
    return value.detach(), student.grad


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_pixel_kd_equals_cirkd_values_and_gradients(temperature):
    student, teacher = _pair(int(temperature))
    ours, ours_grad = _grad(lambda s: pixel_kd_loss(s, teacher, temperature), student)
    ref, ref_grad = _grad(lambda s: cirkd_criterion_kd(s, teacher, temperature), student)
    assert torch.allclose(ours, ref, rtol=1e-12) and torch.allclose(ours_grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_pixel_kd_averages_over_the_pixels_that_are_not_ignored():
    student, teacher = _pair(3)
    valid = torch.ones(2, 6, 7, dtype=torch.bool)
    valid[0, :3] = False
    rows = valid.flatten()
    s_rows = student.permute(0, 2, 3, 1).reshape(-1, 5)[rows][:, :, None, None]
    t_rows = teacher.permute(0, 2, 3, 1).reshape(-1, 5)[rows][:, :, None, None]
    ours, ours_grad = _grad(lambda s: pixel_kd_loss(s, teacher, 2.0, valid), student)
    assert torch.allclose(ours, cirkd_criterion_kd(s_rows, t_rows, 2.0), rtol=1e-12)
    assert (ours_grad[0, :, :3] == 0).all() and (ours_grad[1] != 0).any()
    none_valid = pixel_kd_loss(student, teacher, 2.0, torch.zeros_like(valid))
    assert none_valid.item() == 0.0


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_equals_mmrazor_values_and_gradients(tau):
    student, teacher = _pair(10 + int(tau))
    ours, ours_grad = _grad(lambda s: cwd_loss(s, teacher, tau), student)
    ref, ref_grad = _grad(lambda s: mmrazor_channel_wise_divergence(s, teacher, tau), student)
    assert torch.allclose(ours, ref, rtol=1e-12) and torch.allclose(ours_grad, ref_grad, rtol=1e-10, atol=1e-14)
    same = cwd_loss(student, student, 2.0)
    assert abs(same.item()) < 1e-12


# --- the CLI --------------------------------------------------------------------------------------------


def test_another_tasks_method_or_model_is_refused_before_any_work(tmp_path):
    result = kd_here("distill", *SCENES, "method=crd", cwd=tmp_path)
    assert_one_line_error(result, "method=crd", "segmentation", "pixel_kd", "cwd")
    result = kd_here("distill", *SCENES, "student=default", "student.arch=mlp", cwd=tmp_path)
    assert_one_line_error(result, "student.arch=mlp is a classification model", "segcnn")
    result = kd_here("distill", "dataset=digits", "method=pixel_kd", *FAST, cwd=tmp_path)
    assert_one_line_error(result, "method=pixel_kd distils segmentation models", "classification")
    result = kd_here("train-teacher", "dataset=digits", "teacher.arch=segcnn", *FAST, cwd=tmp_path)
    assert_one_line_error(result, "teacher.arch=segcnn is a segmentation model")
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("summary.json"))


def test_distill_and_evaluate_a_segmenter(tmp_path):
    kd_here_ok("distill", *SCENES, "method=cwd", cwd=tmp_path)
    (run,) = run_dirs(tmp_path / "outputs", "distill")
    result = summary(run)
    assert result["status"] == "complete" and result["task"] == "segmentation"
    for key in ("last_miou", "best_miou", "teacher_miou", "pixel_acc"):
        assert 0 <= result[key] <= 100, (key, result)
    assert "last_top1" not in result
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "train_cwd" in header and "test_miou" in header and "train_pixel_acc" in header
    out = kd_here_ok("evaluate", f"run={run}", "latency_batches=1", *FAST, cwd=tmp_path)
    assert "mIoU %" in out.stdout
    (evaluation,) = run_dirs(tmp_path / "outputs", "evaluate")
    scores = summary(evaluation)
    assert abs(scores["miou"] - result["last_miou"]) < 1e-6
    assert (evaluation / "per_class.csv").read_text().startswith("class,iou")
    reproduced = kd_here_ok("reproduce", str(run), cwd=tmp_path).stdout
    assert "reproduced: the final metrics are identical" in reproduced
    check_predicted_masks(run, tmp_path)
    check_compressed_segmenter(run, tmp_path)
    kd_here_ok("export", f"run={run}", "format=onnx", cwd=tmp_path)
    (exported,) = run_dirs(tmp_path / "outputs", "export")
    assert (
        summary(exported)["argmax_agreement"] >= 99.9
        and summary(exported)["check_inputs"] == "digit_scenes test images"
    )
    onnx_masks = kd_here_ok(
        "predict", f"run={exported / 'model.onnx'}", str(tmp_path / "scenes"), f"out={tmp_path / 'o.csv'}", cwd=tmp_path
    )
    assert "segmented" in onnx_masks.stdout
    report = kd_here_ok("report", str(tmp_path / "outputs"), "--csv", str(tmp_path / "t.csv"), cwd=tmp_path).stdout
    assert "mIoU" in report and "top-1" not in report
    columns = (tmp_path / "t.csv").read_text().splitlines()[0].split(",")
    assert {"best_miou", "last_miou", "teacher_miou"} <= set(columns) and "best_top1" not in columns


def test_a_report_over_two_tasks_is_one_line(tmp_path, short_teachers):
    import shutil

    kd_here_ok("train-teacher", *SCENES, "trainer.max_steps_per_epoch=1", cwd=tmp_path)
    shutil.copytree(short_teachers["digits"], tmp_path / "outputs" / "digits-teacher")
    result = kd_here("report", str(tmp_path / "outputs"), cwd=tmp_path)
    assert_one_line_error(result, "2 metrics (miou, top1", "report them apart")


# --- torchvision's segmentation models ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", [name for name in list_models() if model_task(name) == "segmentation"])
def test_every_segmenter_gives_logits_at_the_input_size_and_its_features(arch):
    from kd_cli.models import create_model
    from kd_cli.models.features import FeatureTap

    model = create_model(arch, num_classes=11, in_channels=1, input_size=40).eval()
    assert model_task(arch) == "segmentation"
    with FeatureTap(model, [*model.kd_feature_layers, model.kd_embedding_layer]) as tap, torch.no_grad():
        logits = model(torch.randn(2, 1, 40, 40))
        features = tap.outputs
    assert logits.shape == (2, 11, 40, 40)
    stages = [features[name] for name in model.kd_feature_layers]
    assert len(features) == len(stages) + 1 and all(f.dim() == 4 for f in features.values())
    assert [f.shape[-1] for f in stages] == sorted((f.shape[-1] for f in stages), reverse=True)  # shallow to deep


def test_an_offline_pretrained_backbone_is_one_line(monkeypatch):
    import urllib.error

    from kd_cli.models import create_model

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(KdError, match="could not load the ImageNet backbone weights of lraspp_mobilenet_v3_large"):
        create_model("lraspp_mobilenet_v3_large", 11, 1, 48, pretrained_backbone=True)


def test_distill_deeplabv3_into_lraspp(tmp_path):
    kd_here_ok(
        "distill",
        *SCENES,
        "dataset.canvas=32",
        "dataset.train_scenes=16",
        "trainer.batch_size=8",
        "trainer.max_steps_per_epoch=1",
        "teacher.arch=deeplabv3_mobilenet_v3_large",
        "student.arch=lraspp_mobilenet_v3_large",
        "method=pixel_kd",
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path / "outputs", "distill")
    assert summary(run)["status"] == "complete" and summary(run)["arch"] == "lraspp_mobilenet_v3_large"


def check_predicted_masks(run, tmp_path):
    """kd predict with a segmenter: a palette PNG per image at the image's own size, equal to the model's
    argmax where the image is at the model's size; a CSV of class shares that sum to 100 %."""
    import csv

    import numpy as np
    from PIL import Image

    from kd_cli.engine.artifacts import load_model

    data = load_dataset(
        {"name": "digit_scenes", "train_scenes": 64, "test_scenes": 32, "canvas": 24, "digits_per_scene": 2}
    )
    images = tmp_path / "scenes"
    images.mkdir()
    Image.fromarray(data.test.images[0, 0].numpy()).save(images / "a.png")
    Image.fromarray(data.test.images[1, 0].numpy()).resize((40, 40)).save(images / "b.png")
    out = kd_here_ok("predict", f"run={run}", str(images), f"out={tmp_path / 'p.csv'}", cwd=tmp_path).stdout
    assert "segmented" in out
    masks = tmp_path / "p_masks"
    first, second = Image.open(masks / "a.png"), Image.open(masks / "b.png")
    assert first.mode == "P" and first.size == (24, 24) and second.size == (40, 40)
    model, spec = load_model(run / "model.safetensors", torch.device("cpu"))
    x = (data.test.images[:1].float() / 255 - spec.mean[0]) / spec.std[0]
    with torch.no_grad():
        expected = model.eval()(x).argmax(1)[0].numpy()
    assert (np.asarray(first) == expected).all()
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["mask"].endswith(".png") for r in rows] == [True, True]
    shares = [float(v) for k, v in rows[0].items() if k.endswith(" %")]
    assert len(shares) == 11 and abs(sum(shares) - 100) < 1e-2
    again = kd_here("predict", f"run={run}", str(images), f"out={tmp_path / 'q.csv'}", cwd=tmp_path)
    assert again.code == 0
    kept = kd_here("predict", f"run={run}", str(images), f"out={tmp_path / 'p2.csv'}", cwd=tmp_path)
    assert kept.code == 0
    (tmp_path / "p2.csv").unlink()
    refused = kd_here("predict", f"run={run}", str(images), f"out={tmp_path / 'p2.csv'}", cwd=tmp_path)
    assert_one_line_error(refused, "p2_masks", "holds files", "overwrite=true")
    kd_here_ok("predict", f"run={run}", str(images), f"out={tmp_path / 'o3.csv'}", "overlay=true", cwd=tmp_path)
    drawn = np.asarray(Image.open(tmp_path / "o3_overlays" / "a.png"))
    grey = data.test.images[0, 0].numpy()
    assert drawn.shape == (24, 24, 3) and (drawn[expected == 0] == grey[expected == 0][:, None]).all()
    coloured = np.asarray(first.convert("RGB"))[expected > 0].astype(float)
    assert np.allclose(drawn[expected > 0], (grey[expected > 0][:, None] + coloured) / 2, atol=1)


# --- segmentation data in its real formats ---------------------------------------------------------------


def _scene_files(count: int, side: int = 20, seed: int = 0):
    """(RGB image, mask) arrays: a coloured square of class 1 + (i % 2) on a dark ground, its border ignored."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for i in range(count):
        image = rng.integers(0, 40, (side, side, 3), dtype=np.uint8)
        mask = np.zeros((side, side), dtype=np.uint8)
        top, left = rng.integers(2, side // 2, 2)
        mask[top : top + 6, left : left + 6] = 1 + i % 2
        image[mask > 0] = (200, 60, 60) if i % 2 == 0 else (60, 200, 60)
        mask[top - 1, left : left + 6] = IGNORE_INDEX  # VOC's border band
        yield image, mask


def _save_mask(path, mask):
    from PIL import Image

    from kd_cli.commands.predict_masks import voc_palette

    picture = Image.fromarray(mask, mode="P")
    picture.putpalette(voc_palette())
    picture.save(path)


def write_voc(root, train: int = 6, val: int = 3):
    """VOCdevkit/VOC2012 as torchvision's VOCSegmentation reads it: JPEGs, palette PNG masks, the lists."""
    from PIL import Image

    base = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True)
    names = []
    for i, (image, mask) in enumerate(_scene_files(train + val)):
        name = f"2007_{i:06d}"
        Image.fromarray(image).save(base / "JPEGImages" / f"{name}.jpg", quality=95)
        _save_mask(base / "SegmentationClass" / f"{name}.png", mask)
        names.append(name)
    (base / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:train]) + "\n")
    (base / "ImageSets/Segmentation/val.txt").write_text("\n".join(names[train:]) + "\n")
    return base


def test_voc_is_read_by_torchvisions_reader_with_its_palette_masks(tmp_path):
    write_voc(tmp_path)
    data = load_dataset({"name": "voc_segmentation", "root": str(tmp_path), "image_size": 32})
    assert data.task == "segmentation" and data.num_classes == 21 and data.class_names[1] == "aeroplane"
    assert data.train.images.shape == (6, 3, 32, 32) and data.test.labels.shape == (3, 32, 32)
    assert set(data.train.labels.unique().tolist()) == {0, 1, 2, IGNORE_INDEX}  # borders stay ignored
    red = data.train.images[0][:, data.train.labels[0] == 1].float().mean(1)
    assert red[0] > 150 and red[1] < 100  # the mask lines up with its image after the resize


def test_missing_voc_is_one_line_naming_the_folder(tmp_path):
    result = kd_here("train-teacher", "dataset=voc_segmentation", f"paths.data={tmp_path}", *FAST, cwd=tmp_path)
    assert_one_line_error(result, "VOC2012 segmentation not found under", "dataset.download=true")


def write_folder_pair(root, count: int = 8):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (image, mask) in enumerate(_scene_files(count, seed=1)):
        Image.fromarray(image).save(root / "images" / f"tile{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"tile{i}.png")  # a greyscale mask
    (root / "classes.txt").write_text("ground\nred\ngreen\n")


def test_a_folder_pair_with_a_class_list(tmp_path):
    write_folder_pair(tmp_path / "mine")
    data = load_dataset({"name": "seg_folder", "root": str(tmp_path / "mine"), "image_size": 16})
    assert data.class_names == ["ground", "red", "green"] and len(data.train) + len(data.test) == 8
    assert data.train.images.shape[1:] == (3, 16, 16) and data.train.labels.max() == IGNORE_INDEX
    kd_here_ok(
        "train-teacher",
        "dataset=seg_folder",
        f"dataset.root={tmp_path / 'mine'}",
        "dataset.image_size=32",
        "teacher.arch=segcnn",
        "trainer.epochs=1",
        "trainer.batch_size=4",
        *FAST,
        cwd=tmp_path,
    )


def test_bad_masks_are_one_line_naming_the_file_or_left_out_with_a_count(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "mine"
    write_folder_pair(root)
    options = {"name": "seg_folder", "root": str(root), "image_size": 16}
    Image.fromarray(np.full((20, 20), 7, dtype=np.uint8)).save(root / "masks" / "tile3.png")
    with pytest.raises(KdError, match=r"mask .*tile3.png holds value 7, neither one of the 3 classes"):
        load_dataset(options)
    Image.fromarray(np.zeros((10, 20), dtype=np.uint8)).save(root / "masks" / "tile3.png")
    with pytest.raises(KdError, match=r"tile3.png is 20x10 but its image is 20x20"):
        load_dataset(options)
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(root / "masks" / "tile3.png")
    with pytest.raises(KdError, match=r"tile3.png is a RGB image; a mask holds one class index per pixel"):
        load_dataset(options)
    (root / "masks" / "tile3.png").unlink()
    with pytest.raises(KdError, match=r"no mask .*tile3.png.*skip_bad_masks=true"):
        load_dataset(options)
    from kd_cli import errors

    errors.WARNINGS.clear()
    data = load_dataset({**options, "skip_bad_masks": True})
    assert len(data.train) + len(data.test) == 7
    assert any("left out 1 image(s) with a bad mask" in line for line in errors.WARNINGS)


def test_the_progress_bar_shows_the_tasks_score_on_its_split():
    from kd_cli.engine.progress import score_text

    assert score_text({"test_miou": 12.345, "images_per_s": 3}) == "test mIoU 12.35"
    assert score_text({"val_top1": 90.0, "val_loss": 0.1}) == "val top-1 90.00"
    assert score_text({"train_loss": 1.0}) == "not scored this epoch"


def check_compressed_segmenter(run, tmp_path):
    """kd compress on a segmenter: pruned, recovered with the segmentation counterpart of `kd` (pixel_kd),
    quantised; smaller on disk, scored in mIoU before and after, and the saved model reloads to the same mIoU."""
    out = kd_here_ok(
        "compress", f"run={run}", "compression=prune_quantize", "trainer.epochs=1", "latency_batches=1", cwd=tmp_path
    ).stdout
    assert "mIoU %" in out and "finetune (pixel_kd)" in out
    (compressed,) = run_dirs(tmp_path / "outputs", "compress")
    result = summary(compressed)
    assert result["status"] == "complete" and result["task"] == "segmentation" and result["method"] == "pixel_kd"
    assert result["params_ratio"] < 0.5 and result["size_ratio"] < 0.3, result
    assert 0 <= result["miou_original"] <= 100 and result["reload_miou"] == result["last_miou"]
    assert "top1_original" not in result
    assert (compressed / "compression.csv").read_text().splitlines()[0].split(",")[5] == "miou"


def test_the_classifier_of_a_segmenter_that_resizes_its_logits_is_found():
    from kd_cli.compress.surgery import classifier_name

    class Resizing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.head = torch.nn.Conv2d(8, 5, 1)

        def forward(self, x):
            return F.interpolate(self.head(self.body(x)), size=x.shape[-2:], mode="bilinear")

    assert classifier_name(Resizing(), torch.zeros(1, 3, 16, 16)) == "head"


def test_an_overlay_of_a_classifiers_predictions_is_refused(short_teachers, tmp_path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "digit.png")
    result = kd_here(
        "predict", f"run={short_teachers['digits']}", str(tmp_path / "digit.png"), "overlay=true", cwd=tmp_path
    )
    assert_one_line_error(result, "overlay=true draws a segmenter's masks", "classifier")
    assert not (tmp_path / "predictions.csv").exists()
