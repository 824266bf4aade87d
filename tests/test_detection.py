"""Detection on the task axis: the digit-scene boxes, the box loader, kd's detectors, the score (COCOeval),
the FPN methods against float64 references written from the authors' code, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from kdrun import FAST, assert_one_line_error, kd_here, kd_here_ok, summary

from kd_cli.data import Augmentation, load_dataset, make_loader
from kd_cli.data.base import BoxSplit, DataSplits
from kd_cli.data.box_loader import augment_boxes
from kd_cli.data.checks import check_splits
from kd_cli.data.scenes import INK
from kd_cli.errors import KdError
from kd_cli.methods import build_method
from kd_cli.methods.fpn_base import check_same_input, level_shapes
from kd_cli.methods.mgd import generation_block, mgd_loss, random_keep
from kd_cli.methods.pkd import pkd_loss
from kd_cli.models import create_model, model_task
from kd_cli.tasks import get_task
from kd_cli.tasks.coco_map import ImageBoxes, coco_map

SMALL = ["dataset.train_scenes=24", "dataset.test_scenes=16", "trainer.batch_size=8"]
# The teacher recipe of the CLI tests: enough steps for a few mAP points (the floor a teacher must pass is 1).
TEACHER = [
    "dataset=digit_detection",
    "dataset.train_scenes=256",
    "dataset.test_scenes=64",
    "teacher.arch=kd_fcos",
    "teacher.kwargs.width=16",
    "trainer.epochs=6",
    "trainer.batch_size=16",
    "optim.lr=0.01",
    "optim.weight_decay=1e-4",
    "trainer.grad_clip=10",
    "trainer.precision=fp32",
    *FAST,
]


def config(name: str, **options) -> dict:
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(OmegaConf.load(f"configs/method/{name}.yaml"))
    assert isinstance(base, dict)
    return {**base, **options}


# --- data -------------------------------------------------------------------------------------------


def test_each_box_holds_its_digits_ink_and_the_splits_are_detection():
    data = load_dataset({"name": "digit_detection", **dict(o.split("=") for o in [])})
    assert data.task == "detection" and data.class_names == [str(d) for d in range(10)]
    assert isinstance(data.train, BoxSplit) and len(data.train) == 1000 and len(data.test) == 300
    scenes = load_dataset({"name": "digit_scenes"})  # the same pixels, labelled by masks
    assert torch.equal(scenes.train.images, data.train.images)
    for i in range(20):
        mask = scenes.train.labels[i]
        for box, label in zip(data.train.boxes[i], data.train.labels[i]):
            x1, y1, x2, y2 = box.long().tolist()
            inside = mask[y1:y2, x1:x2]
            # the digit's own ink lies within its box (a later digit may cover part of it)
            assert x1 < x2 and y1 < y2 and (inside == label + 1).any()
        ink = data.train.images[i, 0] >= INK
        covered = torch.zeros_like(ink)
        for x1, y1, x2, y2 in data.train.boxes[i].long().tolist():
            covered[y1:y2, x1:x2] = True
        assert not (ink & ~covered).any()  # no ink outside every box


def test_a_detection_data_set_is_checked_for_unlearnable_classes_and_empty_training():
    data = load_dataset({"name": "digit_detection", "train_scenes": 20, "test_scenes": 10})
    no_nines = [labels[labels != 9] for labels in data.train.labels]
    boxes = [b[lab != 9] for b, lab in zip(data.train.boxes, data.train.labels)]
    train = BoxSplit(data.train.images, boxes, no_nines, data.train.image_ids)
    with pytest.raises(KdError, match="no boxes of class 9"):
        check_splits(DataSplits(**{**vars(data), "train": train}), "digit_detection")
    empty = BoxSplit(data.train.images, [b[:0] for b in boxes], [lab[:0] for lab in no_nines], data.train.image_ids)
    with pytest.raises(KdError, match="no boxes at all"):
        check_splits(DataSplits(**{**vars(data), "train": empty}), "digit_detection")


def test_validation_is_held_out_of_the_training_scenes():
    data = load_dataset({"name": "digit_detection", "train_scenes": 40, "test_scenes": 10, "val_fraction": 0.25})
    assert isinstance(data.val, BoxSplit) and len(data.val) == 10 and len(data.train) == 30
    assert not set(data.val.image_ids) & set(data.train.image_ids)


def test_shift_and_flip_move_the_boxes_with_the_pixels():
    images = torch.zeros(6, 1, 32, 32, dtype=torch.uint8)
    boxes = []
    for i in range(6):  # a bright block exactly inside each box; one box touches the border
        x1, y1 = 2 * i, 30 - 5 * i if i else 27
        images[i, 0, y1 : y1 + 5, x1 : x1 + 7] = 255
        boxes.append(torch.tensor([[x1, y1, x1 + 7, y1 + 5]], dtype=torch.float32))
    generator = torch.Generator().manual_seed(3)
    moved, moved_boxes = augment_boxes(images, boxes, Augmentation(crop_padding=4, hflip=True), generator)
    for image, box in zip(moved, moved_boxes):
        bright = (image[0] > 0.5).nonzero()
        if len(box) == 0:
            continue
        x1, y1, x2, y2 = box[0, :4].tolist()
        assert bright[:, 1].min() == x1 and bright[:, 1].max() + 1 == x2
        assert bright[:, 0].min() == y1 and bright[:, 0].max() + 1 == y2


def test_the_box_loader_gives_targets_as_torchvision_takes_them_and_repeats_its_epochs():
    data = load_dataset({"name": "digit_detection", "train_scenes": 40, "test_scenes": 10})
    loader = make_loader(
        data.train,
        batch_size=8,
        train=True,
        spec=Augmentation(crop_padding=4),
        mean=[0.1],
        std=[0.2],
        device=torch.device("cpu"),
        seed=5,
    )
    assert len(loader) == 5
    first = [(images.clone(), targets) for images, targets in loader]
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    images, targets = first[0]
    assert images.shape == (8, 1, 48, 48) and len(targets) == 8
    assert set(targets[0]) == {"boxes", "labels", "image_id", "size", "scale"}
    assert targets[0]["boxes"].shape[1] == 4 and targets[0]["labels"].dtype == torch.int64
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], images)


def test_rotation_is_refused_for_detection():
    data = load_dataset({"name": "digit_detection", "train_scenes": 8, "test_scenes": 4})
    with pytest.raises(KdError, match="rotate_degrees=10.*axis-aligned"):
        make_loader(
            data.train,
            batch_size=4,
            train=True,
            spec=Augmentation(rotate_degrees=10),
            mean=[0],
            std=[1],
            device=torch.device("cpu"),
            seed=0,
        )


# --- models -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["kd_fcos_tiny", "fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn"])
def test_detectors_train_on_kd_batches_and_give_labels_0_to_c_minus_1(arch):
    torch.manual_seed(0)
    model = create_model(arch, 3, 1, 64, score_thresh=0.0)
    assert model_task(arch) == "detection"
    targets = [{"boxes": torch.tensor([[4.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([2])}] * 2
    model.train()
    losses = model(torch.randn(2, 1, 64, 64), targets)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        detections = model(torch.randn(2, 1, 64, 64))
    labels = torch.cat([d["labels"] for d in detections])
    assert len(labels) and labels.min() >= 0 and labels.max() <= 2  # Faster R-CNN's background is not a label


def test_kd_fcos_needs_fpn_channels_in_groups_of_32():
    with pytest.raises(KdError, match="fpn_channels=48.*multiple of 32"):
        create_model("kd_fcos", 10, 1, 48, fpn_channels=48)


# --- score ------------------------------------------------------------------------------------------


def test_the_score_is_cocoevals_and_ground_truth_scores_100():
    task = get_task("detection")
    score = task.new_score(3)
    truth = [
        {
            "boxes": torch.tensor([[1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 35.0]]),
            "labels": torch.tensor([0, 2]),
            "image_id": 7,
            "size": (40, 40),
            "scale": 1.0,
        },
        {
            "boxes": torch.tensor([[5.0, 5.0, 15.0, 25.0]]),
            "labels": torch.tensor([1]),
            "image_id": 9,
            "size": (40, 40),
            "scale": 1.0,
        },
    ]
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))} for t in truth]
    score.update(perfect, truth)
    assert score.result()["map"] == pytest.approx(100.0)
    shifted = [
        {**p, "boxes": p["boxes"] + 2.0, "scores": torch.tensor([0.9, 0.4][: len(p["labels"])])} for p in perfect
    ]
    score = task.new_score(3)
    score.update(shifted, truth)
    expected = coco_map(
        [ImageBoxes(t["image_id"], t["boxes"], t["labels"], width=40, height=40) for t in truth],
        [ImageBoxes(t["image_id"], p["boxes"], p["labels"], p["scores"]) for t, p in zip(truth, shifted)],
        [0, 1, 2],
        ["0", "1", "2"],
    ).stats
    result = score.result()
    assert result["map"] == pytest.approx(100 * expected["map"], abs=1e-4)
    assert result["map50"] == pytest.approx(100 * expected["map50"], abs=1e-4)
    assert 0 < result["map"] < 100


def test_non_finite_boxes_are_not_scored_as_hits():
    task = get_task("detection")
    score = task.new_score(2)
    truth = [
        {
            "boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]),
            "labels": torch.tensor([0]),
            "image_id": 1,
            "size": (10, 10),
            "scale": 1.0,
        }
    ]
    score.update(
        [{"boxes": torch.full((1, 4), float("nan")), "labels": torch.tensor([0]), "scores": torch.ones(1)}], truth
    )
    assert not score.all_finite and score.result()["map"] == 0.0


# --- methods: float64 references written from the authors' code ----------------------------------------


def pkd_reference(preds_s: torch.Tensor, preds_t: torch.Tensor) -> torch.Tensor:
    """mmrazor's PKDLoss (configs/distill/mmdet/pkd), loss_weight 1, written out in float64."""

    def norm(feat):
        n, c, h, w = feat.shape
        feat = feat.permute(1, 0, 2, 3).reshape(c, -1)
        mean = feat.mean(dim=-1, keepdim=True)
        std = feat.std(dim=-1, keepdim=True)
        feat = (feat - mean) / (std + 1e-6)
        return feat.reshape(c, n, h, w).permute(1, 0, 2, 3)

    return F.mse_loss(norm(preds_s), norm(preds_t)) / 2


def mgd_reference(preds_s, preds_t, generation, mat) -> torch.Tensor:
    """The authors' FeatureLoss.get_dis_loss (yzd-v/MGD, det/mmdet/distillation/losses/mgd.py), its random
    draw `mat` given: masked where mat > 1 - lambda, MSELoss(reduction='sum') / N."""
    n = preds_t.shape[0]
    masked = torch.mul(preds_s, mat)
    new = generation(masked)
    return torch.nn.MSELoss(reduction="sum")(new, preds_t) / n


def test_pkd_loss_equals_mmrazors_in_values_and_gradients():
    torch.manual_seed(0)
    s = (torch.randn(3, 8, 5, 6, dtype=torch.float64) * 3 + 1).requires_grad_()
    t = torch.randn(3, 8, 5, 6, dtype=torch.float64) * 0.5 - 2
    ours, ref = pkd_loss(s, t), pkd_reference(s, t)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-14)
    (g_ours,) = torch.autograd.grad(ours, s)
    s2 = s.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(pkd_reference(s2, t), s2)
    assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-14)
    assert pkd_loss(t, t) < 1e-10  # identical maps: r = 1
    assert torch.allclose(pkd_loss(2 * t + 5, t), torch.zeros((), dtype=torch.float64), atol=1e-10)  # scale-free


def test_mgd_loss_equals_the_authors_in_values_and_gradients():
    torch.manual_seed(0)
    s = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    generation = generation_block(4).double()
    draw = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    lambda_mgd = 0.65
    mat = torch.where(draw > 1 - lambda_mgd, 0, 1).double()
    keep = (draw <= 1 - lambda_mgd).double()
    ours, ref = mgd_loss(s, t, generation, keep), mgd_reference(s, t, generation, mat)
    assert torch.allclose(ours, ref, rtol=1e-12)
    grads = torch.autograd.grad(ours, [s, *generation.parameters()])
    refs = torch.autograd.grad(mgd_reference(s, t, generation, mat), [s, *generation.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-10) for a, b in zip(grads, refs))
    masked = random_keep(torch.zeros(64, 4, 30, 30), lambda_mgd)
    assert masked.shape == (64, 1, 30, 30) and abs(1 - float(masked.mean()) - lambda_mgd) < 0.02


@pytest.mark.parametrize(("name", "term"), [("pkd", "pkd"), ("mgd", "mgd"), ("fpn_fitnet", "hint"), ("fpn_cwd", "cwd")])
def test_fpn_methods_keep_the_detectors_losses_and_every_parameter_learns(name, term):
    torch.manual_seed(0)
    student, teacher = create_model("kd_fcos_tiny", 4, 1, 32), create_model("kd_fcos", 4, 1, 32, width=8)
    method = build_method(config(name), student, teacher, task="detection")
    method.train()
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]]), "labels": torch.tensor([1])}] * 2
    outputs, terms = method(torch.randn(2, 1, 32, 32), targets)
    assert outputs is None
    assert {"det_classification", "det_bbox_regression", "det_bbox_ctrness", term} <= set(terms)
    assert all(
        not n.startswith("det_") for n in set(terms) - {"det_classification", "det_bbox_regression", "det_bbox_ctrness"}
    )
    sum(terms.values()).backward()
    assert [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None] == []
    assert all(p.grad is None for p in teacher.parameters())


def test_the_teacher_sees_the_students_backbone_input():
    torch.manual_seed(0)
    student, teacher = create_model("kd_fcos_tiny", 4, 1, 32), create_model("kd_fcos", 4, 1, 32, width=8)
    method = build_method(config("pkd"), student, teacher, task="detection")
    seen = {}
    teacher.detector.backbone.register_forward_hook(lambda m, args, out: seen.update(teacher=args[0]))
    student.detector.backbone.register_forward_hook(lambda m, args, out: seen.update(student=args[0]))
    images = torch.randn(2, 1, 32, 32)
    method.train()
    method(images, [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]]), "labels": torch.tensor([1])}] * 2)
    assert torch.equal(seen["teacher"], seen["student"]) and torch.equal(seen["student"], images)


def test_a_teacher_built_for_another_input_size_or_strides_is_refused():
    student = create_model("kd_fcos_tiny", 4, 1, 32)
    with pytest.raises(KdError, match="prepare images differently.*min_size.*same input size"):
        check_same_input(student, create_model("kd_fcos", 4, 1, 64, width=8))
    with pytest.raises(KdError, match="size_divisible 16 vs 32.*pair detectors of one family"):
        check_same_input(student, create_model("fcos_resnet50_fpn", 4, 1, 32))
    teacher = create_model("fasterrcnn_mobilenet_v3_large_fpn", 4, 1, 32)
    assert list(level_shapes(student)) != list(level_shapes(teacher))
    with pytest.raises(KdError, match="(prepare images differently|FPN levels of equal size)"):
        build_method(config("pkd"), student, teacher, task="detection")


def test_fpn_levels_pair_by_stride_across_backbones():
    from kd_cli.methods.fpn_base import level_pairs

    teacher = create_model("fasterrcnn_resnet50_fpn", 3, 3, 96)
    student = create_model("fasterrcnn_mobilenet_v3_large_fpn", 3, 3, 96)
    assert level_pairs(level_shapes(student), level_shapes(teacher)) == [("0", "3"), ("pool", "pool")]
    method = build_method(config("pkd"), student, teacher.eval(), task="detection")
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])}] * 2
    _, terms = method(torch.randn(2, 3, 96, 96), targets)
    assert terms["pkd"].requires_grad and torch.isfinite(terms["pkd"]) and "det_classifier" in terms


def test_fpn_methods_are_refused_for_classification():
    with pytest.raises(KdError, match="method=pkd distils detection models"):
        build_method(config("pkd"), create_model("cnn", 10, 1, 8), create_model("cnn", 10, 1, 8), task="classification")


# --- the CLI ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detection_teacher(tmp_path_factory):
    """A kd_fcos teacher on small digit scenes, trained by `kd train-teacher` in this process."""
    root = tmp_path_factory.mktemp("detection")
    run = root / "teacher"
    kd_here_ok("train-teacher", *TEACHER, f"hydra.run.dir={run}", cwd=root)
    return run


def test_train_teacher_writes_map_summaries_and_the_detector_losses(detection_teacher):
    s = summary(detection_teacher)
    assert s["status"] == "complete" and s["task"] == "detection" and s["metric"] == "map"
    assert s["last_map"] >= 1.0 and s["best_map"] >= s["last_map"]
    header = (detection_teacher / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_det_classification", "train_det_bbox_regression", "test_map", "test_map50"} <= set(header)
    assert "train_pixel_acc" not in header and "test_loss" not in header


def test_distill_with_pkd_scores_the_teacher_and_the_student(detection_teacher, tmp_path):
    run = tmp_path / "pkd"
    kd_here_ok(
        "distill",
        *TEACHER[:3],
        *TEACHER[6:],
        "method=pkd",
        "trainer.epochs=1",
        f"teacher.checkpoint={detection_teacher}/model.safetensors",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    s = summary(run)
    assert s["status"] == "complete" and s["teacher_map"] == pytest.approx(summary(detection_teacher)["last_map"])
    assert "train_pkd" in (run / "metrics.csv").read_text().splitlines()[0]
    resolved = (run / "config_resolved.yaml").read_text()
    assert "name: pkd" in resolved and "arch: kd_fcos_tiny" in resolved
    assert s["last_map50"] >= s["last_map"]
    report = kd_here("report", str(run), cwd=tmp_path)
    assert report.code == 0 and "last mAP %" in report.stdout and "teacher mAP %" in report.stdout


def test_an_interrupted_detection_distillation_resumes_longer(detection_teacher, tmp_path):
    run = tmp_path / "mgd"
    common = [*TEACHER[:3], *TEACHER[6:], "method=mgd", "method.alpha_mgd=0.002"]
    weights = f"teacher.checkpoint={detection_teacher}/model.safetensors"
    kd_here_ok("distill", *common, weights, "trainer.epochs=1", f"hydra.run.dir={run}", cwd=tmp_path)
    (run / "summary.json").write_text(json.dumps({**summary(run), "status": "interrupted"}))
    kd_here_ok("distill", f"resume={run}", "trainer.epochs=2", "resume_extend=true", cwd=tmp_path)
    done = summary(run)
    assert (
        done["status"] == "complete" and done["epochs"] == 2 and done["resumes"][-1]["changes"] == ["trainer.epochs=2"]
    )
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"] and "train_mgd" in rows[0]


def test_teacher_options_beside_a_checkpoint_must_agree_with_it(detection_teacher, tmp_path):
    common = [*TEACHER[:3], *TEACHER[6:], "method=pkd", f"teacher.checkpoint={detection_teacher}"]
    out = f"hydra.run.dir={tmp_path / 'out'}"
    result = kd_here("distill", *common, "teacher.kwargs.width=32", out, cwd=tmp_path)
    assert_one_line_error(result, "teacher.kwargs.width=32 disagrees", "width=16", "drop teacher.kwargs.width=")
    result = kd_here("distill", *common, "teacher=fcos_resnet50_fpn", out, cwd=tmp_path)
    assert_one_line_error(result, "teacher=fcos_resnet50_fpn disagrees", "holds a kd_fcos")
    assert not (tmp_path / "out").exists()


def test_an_untrained_teacher_is_refused_before_distilling(tmp_path):
    weak = tmp_path / "weak"
    kd_here_ok(
        "train-teacher",
        "dataset=digit_detection",
        *SMALL,
        "trainer.epochs=1",
        "teacher.kwargs.width=8",
        *FAST,
        f"hydra.run.dir={weak}",
        cwd=tmp_path,
    )
    assert summary(weak)["last_map"] < 1.0
    result = kd_here(
        "distill",
        "dataset=digit_detection",
        *SMALL,
        "method=pkd",
        "trainer.epochs=1",
        *FAST,
        f"teacher.checkpoint={weak}/model.safetensors",
        f"hydra.run.dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert_one_line_error(result, "no better than an untrained model", "give a trained teacher")
    assert not (tmp_path / "out").exists()


def test_a_classification_method_or_model_on_boxes_is_one_line(tmp_path):
    result = kd_here("distill", "dataset=digit_detection", *SMALL, "method=dkd", *FAST, cwd=tmp_path)
    assert_one_line_error(result, "method=dkd", "detection")
    result = kd_here("train-teacher", "dataset=digit_detection", *SMALL, "teacher.arch=cnn", *FAST, cwd=tmp_path)
    assert_one_line_error(result, "detection")
    result = kd_here(
        "train-teacher", "dataset=digit_detection", *SMALL, "augmentation.rotate_degrees=15", *FAST, cwd=tmp_path
    )
    assert_one_line_error(result, "rotate_degrees")


def test_evaluate_reports_coco_figures_and_writes_a_results_file(detection_teacher, tmp_path):
    run = tmp_path / "eval"
    kd_here_ok("evaluate", f"run={detection_teacher}", *FAST, f"hydra.run.dir={run}", cwd=tmp_path)
    s = summary(run)
    assert s["status"] == "complete" and s["metric"] == "map"
    assert s["map"] == pytest.approx(summary(detection_teacher)["last_map"], abs=1e-6)
    assert {"map50", "map75", "map_small", "mar100", "per_class_ap", "latency_ms"} <= set(s)
    detections = json.loads((run / "detections.json").read_text())
    assert detections and set(detections[0]) == {"image_id", "category_id", "bbox", "score"}
    assert (run / "per_class.csv").read_text().splitlines()[0] == "class,ap"


def test_compress_prunes_a_detectors_backbone_recovers_with_pkd_and_the_result_exports(detection_teacher, tmp_path):
    run = tmp_path / "pruned"
    budget = ["trainer.epochs=1", "trainer.grad_clip=10", "latency_batch_sizes=[1]", "latency_batches=2"]
    kd_here_ok("compress", f"run={detection_teacher}", *budget, *FAST, f"hydra.run.dir={run}", cwd=tmp_path)
    s = summary(run)
    assert s["status"] == "complete" and s["metric"] == "map" and s["method"] == "pkd"
    assert s["map_original"] == pytest.approx(summary(detection_teacher)["last_map"], abs=1e-6)
    assert s["params_ratio"] < 0.8 and s["size_ratio"] < 0.8 and s["macs_ratio"] < 1
    assert s["reload_map"] == pytest.approx(s["last_map"], abs=1e-9)
    steps = [row["step"] for row in s["rows"]]
    assert steps == ["original", "prune_structured", "+ finetune (pkd)"]
    fpn_widths = {
        k: v
        for k, v in json.loads((run / "model.json").read_text())["extra"]["transforms"][0]["layers"].items()
        if "fpn.layer_blocks" in k
    }
    assert not fpn_widths  # the levels the heads read keep their widths
    export = tmp_path / "export"
    kd_here_ok("export", f"run={run}", "check_batch_size=2", f"hydra.run.dir={export}", cwd=tmp_path)
    assert summary(export)["labels_differing"] == 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["compression=quantize_int8"], ["quantize_int8 does not serve detectors", "prune"]),
        (["compression.prune_structured.importance=taylor"], ["importance=taylor", "magnitude"]),
    ],
)
def test_compress_steps_a_detector_cannot_take_are_one_line(detection_teacher, tmp_path, args, words):
    out = tmp_path / "out"
    result = kd_here("compress", f"run={detection_teacher}", *args, *FAST, f"hydra.run.dir={out}", cwd=tmp_path)
    assert_one_line_error(result, *words)
    assert not out.exists()


def scene_files(folder, count: int = 4, wide: bool = False) -> list:
    """Test scenes of the digit detection set as PNG files (one twice as wide: letterboxed by predict)."""
    from PIL import Image

    data = load_dataset({"name": "digit_detection", "train_scenes": 8, "test_scenes": count})
    folder.mkdir()
    for i, image in enumerate(data.test.images):
        picture = Image.fromarray(image[0].numpy())
        if wide and i == 0:
            picture = picture.resize((2 * picture.width, picture.height))
        picture.save(folder / f"scene{i}.png")
    return sorted(folder.iterdir())


def test_export_writes_an_onnx_detector_that_agrees_with_pytorch_and_predict_reads_both(detection_teacher, tmp_path):
    export = tmp_path / "export"
    kd_here_ok("export", f"run={detection_teacher}", "check_batch_size=4", f"hydra.run.dir={export}", cwd=tmp_path)
    s = summary(export)
    assert s["status"] == "complete" and s["exporter"].startswith("torch.onnx.export(dynamo=False)")
    assert s["images_checked"] == 5 and s["boxes_checked"] > 0 and s["check_batch_sizes"] == [1]
    assert s["max_box_diff"] <= 1e-3 and s["max_abs_diff"] <= 1e-4 and s["labels_differing"] == 0
    assert s["images_with_another_box_count"] == 0 and s["dynamic_batch"] is False
    files = scene_files(tmp_path / "scenes")
    low = "score_threshold=0.1"
    kd_here_ok("predict", f"run={detection_teacher}", str(tmp_path / "scenes"), low, "out=torch.csv", cwd=tmp_path)
    kd_here_ok("predict", f"run={export}/model.onnx", str(tmp_path / "scenes"), low, "out=onnx.csv", cwd=tmp_path)
    rows = (tmp_path / "torch.csv").read_text().splitlines()
    assert rows[0] == "file,image_id,class,score,x1,y1,x2,y2" and len(rows) > len(files)
    assert {row.split(",")[0] for row in rows[1:]} == {str(f) for f in files}
    assert [r.split(",")[:3] for r in rows] == [
        r.split(",")[:3] for r in (tmp_path / "onnx.csv").read_text().splitlines()
    ]
    results = json.loads((tmp_path / "torch.json").read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert min(r["score"] for r in results) >= 0.1 and {r["image_id"] for r in results} <= {1, 2, 3, 4}


def test_import_reads_a_torchvision_layout_detector_checkpoint_and_scores_it(detection_teacher, tmp_path):
    from safetensors.torch import load_file

    state = {k.removeprefix("detector."): v for k, v in load_file(detection_teacher / "model.safetensors").items()}
    torch.save({"model": state, "epoch": 6}, tmp_path / "fcos.pth")  # torchvision's references save it so
    run = tmp_path / "imported"
    arch = ["arch=kd_fcos", "model.kwargs.width=16"]
    kd_here_ok("import", str(tmp_path / "fcos.pth"), *arch, *TEACHER[:3], *FAST, f"hydra.run.dir={run}", cwd=tmp_path)
    s = summary(run)
    assert s["status"] == "complete" and s["metric"] == "map" and s["task"] == "detection"
    assert s["map"] == pytest.approx(summary(detection_teacher)["last_map"], abs=1e-6)
    wrong = kd_here("import", str(tmp_path / "fcos.pth"), "arch=kd_fcos", *TEACHER[:3], *FAST, cwd=tmp_path)
    assert_one_line_error(wrong, "do not fit the model", "of another shape", "check the architecture")


def test_torchscript_export_of_a_detector_is_one_line(detection_teacher, tmp_path):
    result = kd_here(
        "export", f"run={detection_teacher}", "format=torchscript", f"hydra.run.dir={tmp_path / 'o'}", cwd=tmp_path
    )
    assert_one_line_error(result, "format=torchscript", "format=onnx")
    assert not (tmp_path / "o").exists()


def test_predict_draws_boxes_in_each_images_own_pixels(detection_teacher, tmp_path):
    from PIL import Image

    files = scene_files(tmp_path / "scenes", wide=True)
    out = tmp_path / "p.csv"
    kd_here_ok(
        "predict",
        f"run={detection_teacher}",
        *map(str, files),
        f"out={out}",
        "overlay=true",
        "score_threshold=0",
        cwd=tmp_path,
    )
    drawn = sorted((tmp_path / "p_boxes").iterdir())
    assert [d.name for d in drawn] == [f.name for f in files]
    assert Image.open(drawn[0]).size == Image.open(files[0]).size == (96, 48)
    for row in out.read_text().splitlines()[1:]:
        file, _, _, _, *box = row.split(",")
        width, height = Image.open(file).size
        x1, y1, x2, y2 = map(float, box)
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
    again = kd_here("predict", f"run={detection_teacher}", str(files[0]), f"out={out}", "overwrite=false", cwd=tmp_path)
    assert_one_line_error(again, "exists", "overwrite=true")


def test_predict_options_that_do_not_fit_the_model_are_one_line(detection_teacher, tmp_path):
    files = scene_files(tmp_path / "scenes", count=1)
    result = kd_here("predict", f"run={detection_teacher}", str(files[0]), f"out={tmp_path / 'p.json'}", cwd=tmp_path)
    assert_one_line_error(result, "names the CSV")
    result = kd_here("predict", f"run={detection_teacher}", str(files[0]), "score_threshold=1.5", cwd=tmp_path)
    assert_one_line_error(result, "between 0 and 1")


def test_predicted_boxes_go_back_to_the_images_pixels_and_results_use_the_files_ids():
    from types import SimpleNamespace

    from kd_cli.commands.predict_boxes import image_ids, in_image, write_results

    model = SimpleNamespace(spec=SimpleNamespace(num_classes=3), source="m")
    found = {
        "boxes": torch.tensor([[10.0, 4.0, 30.0, 20.0], [0.0, 0.0, 64.0, 40.0], [1.0, 1.0, 2.0, 2.0]]),
        "scores": torch.tensor([0.6, 0.9, 0.2]),
        "labels": torch.tensor([2, 0, 1]),
    }
    # a 128 x 80 image letterboxed into 64 x 64: scale 0.5, padded below
    kept = in_image(found, 0.5, torch.Size([80, 128]), 0.5, model)  # type: ignore[arg-type]
    assert [k["label"] for k in kept] == [0, 2] and kept[0]["score"] == pytest.approx(0.9)
    assert kept[1]["box"] == [20.0, 8.0, 60.0, 40.0] and kept[0]["box"] == [0.0, 0.0, 128.0, 80.0]
    from pathlib import Path

    assert image_ids([Path("000000397133.jpg"), Path("000000000785.jpg")]) == [397133, 785]
    assert image_ids([Path("cat.jpg"), Path("7.jpg")]) == [1, 2]
    rows = [{"image_id": 5, "detections": kept}]
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "r.json")
        write_results(path, rows, [1, 3, 90])
        written = json.loads(path.read_text())
    assert written[1] == {"image_id": 5, "category_id": 90, "bbox": [20.0, 8.0, 40.0, 32.0], "score": 0.6}
    bad = {**found, "labels": torch.tensor([2, 0, 3])}
    with pytest.raises(KdError, match="class 3"):
        in_image(bad, 1.0, torch.Size([64, 64]), 0.0, model)  # type: ignore[arg-type]


def fgd_reference(preds_s, preds_t, gt_bboxes, img_shape, temp, weights, blocks):
    """mmrazor's FGDLoss.forward (the authors' loss, rows by y), written out in float64; `blocks` give the
    GcBlocks' (conv_mask, channel_add_conv) for the student and the teacher."""
    alpha, beta, gamma, lam = weights
    n, c, h, w = preds_s.shape

    def get_attention(preds):
        value = torch.abs(preds)
        fea_map = value.mean(axis=1, keepdim=True)
        s_att = (h * w * F.softmax((fea_map / temp).view(n, -1), dim=1)).view(n, h, w)
        channel_map = value.mean(axis=2, keepdim=False).mean(axis=2, keepdim=False)
        return s_att, c * F.softmax(channel_map / temp, dim=1)

    s_t, c_t = get_attention(preds_t)
    s_s, c_s = get_attention(preds_s)
    mask_fg = torch.zeros_like(s_t)
    mask_bg = torch.ones_like(s_t)
    for i in range(n):
        new = torch.ones_like(gt_bboxes[i])
        new[:, 0] = gt_bboxes[i][:, 0] / img_shape[1] * w
        new[:, 2] = gt_bboxes[i][:, 2] / img_shape[1] * w
        new[:, 1] = gt_bboxes[i][:, 1] / img_shape[0] * h
        new[:, 3] = gt_bboxes[i][:, 3] / img_shape[0] * h
        wmin, wmax = torch.floor(new[:, 0]).int(), torch.ceil(new[:, 2]).int()
        hmin, hmax = torch.floor(new[:, 1]).int(), torch.ceil(new[:, 3]).int()
        height, width = hmax.view(1, -1) + 1 - hmin.view(1, -1), wmax.view(1, -1) + 1 - wmin.view(1, -1)
        area = 1.0 / height.double() / width.double()  # (in float64: the int sizes would give float32)
        for j in range(len(gt_bboxes[i])):
            cells = mask_fg[i][hmin[j] : hmax[j] + 1, wmin[j] : wmax[j] + 1]
            mask_fg[i][hmin[j] : hmax[j] + 1, wmin[j] : wmax[j] + 1] = torch.max(cells, area[0][j])
        mask_bg[i] = torch.where(mask_fg[i] > 0, 0, 1)
        if torch.sum(mask_bg[i]):
            mask_bg[i] /= torch.sum(mask_bg[i])
    mse = torch.nn.MSELoss(reduction="sum")
    fg_m, bg_m = mask_fg.unsqueeze(1), mask_bg.unsqueeze(1)
    c4, s4 = c_t.unsqueeze(-1).unsqueeze(-1), s_t.unsqueeze(1)
    fea_t = torch.mul(torch.mul(preds_t, torch.sqrt(s4)), torch.sqrt(c4))
    fea_s = torch.mul(torch.mul(preds_s, torch.sqrt(s4)), torch.sqrt(c4))
    fg = mse(torch.mul(fea_s, torch.sqrt(fg_m)), torch.mul(fea_t, torch.sqrt(fg_m))) / len(fg_m)
    bg = mse(torch.mul(fea_s, torch.sqrt(bg_m)), torch.mul(fea_t, torch.sqrt(bg_m))) / len(bg_m)
    mask = torch.sum(torch.abs(c_s - c_t)) / len(c_s) + torch.sum(torch.abs(s_s - s_t)) / len(s_s)

    def pool_and_add(x, conv_mask, channel_add):
        batch, channel, height, width = x.size()
        input_x = x.view(batch, channel, height * width).unsqueeze(1)
        context_mask = F.softmax(conv_mask(x).view(batch, 1, height * width), dim=2).unsqueeze(-1)
        context = torch.matmul(input_x, context_mask).view(batch, channel, 1, 1)
        return x + channel_add(context)

    (mask_s, add_s), (mask_t, add_t) = blocks
    rela = mse(pool_and_add(preds_s, mask_s, add_s), pool_and_add(preds_t, mask_t, add_t)) / n
    return alpha * fg + beta * bg + gamma * mask + lam * rela


def test_fgd_equals_mmrazors_fgd_loss_in_values_and_gradients():
    from kd_cli.methods.fgd import GcBlock, attention_loss, box_masks, focal_losses, relation_loss

    torch.manual_seed(0)
    s = torch.randn(2, 8, 6, 5, dtype=torch.float64, requires_grad=True)  # a map that is not square
    t = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    boxes = [
        torch.tensor([[3.0, 4.0, 20.0, 30.0], [10.0, 2.0, 18.0, 9.0]], dtype=torch.float64),
        torch.tensor([[0.0, 30.0, 39.0, 47.0]], dtype=torch.float64),
    ]
    image = (48, 40)
    block_s, block_t = GcBlock(8).double(), GcBlock(8).double()
    for block in (block_s, block_t):  # away from the identity start, so the relation term is tested
        torch.nn.init.normal_(block.transform[-1].weight, std=0.3)
    weights = (1e-3, 5e-4, 1e-3, 5e-6)
    foreground, background = box_masks(boxes, (6, 5), image, torch.float64)
    fg, bg = focal_losses(s, t, foreground, background, 0.5)
    ours = (
        weights[0] * fg
        + weights[1] * bg
        + weights[2] * attention_loss(s, t, 0.5)
        + weights[3] * relation_loss(s, t, block_s, block_t)
    )
    blocks = ((block_s.mask, block_s.transform), (block_t.mask, block_t.transform))
    ref = fgd_reference(s, t, boxes, image, 0.5, weights, blocks)
    assert torch.allclose(ours, ref, rtol=1e-12)
    params = [s, *block_s.parameters(), *block_t.parameters()]
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(ref, params)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-16)
    assert not foreground[0, :, 4].any() and not foreground[1, :3].any() and foreground[1, 3:].all()  # rows by y


def test_without_pycocotools_a_detection_run_asks_for_it_in_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pycocotools" else real(name, *a))
    result = kd_here("train-teacher", "dataset=digit_detection", *SMALL, *FAST, cwd=tmp_path)
    assert_one_line_error(result, "pycocotools", "pip install 'kd-cli[coco]'")


def test_a_teacher_trained_on_other_normalisation_is_refused_by_the_fpn_methods():
    from kd_cli.models.input_form import Form, feed_own_form

    student, teacher = create_model("kd_fcos_tiny", 4, 1, 32), create_model("kd_fcos", 4, 1, 32, width=8)
    feed_own_form(teacher, Form(1, 32, (0.1,), (0.2,)), Form(1, 32, (0.5,), (0.5,)))
    with pytest.raises(KdError, match="teacher was trained on images of another form.*dataset.mean"):
        check_same_input(student, teacher)


# --- CrossKD -----------------------------------------------------------------------------------------


def crosskd_reference(stu_hold, tea_hold, reused_cls, tea_cls, reused_boxes, tea_boxes, avg_factor):
    """Written from the authors' CrossKDFCOS (align_scale, KDQualityFocalLoss beta 1 weight 0.4, IoULoss
    log mode weight 0.75) and mmdetection's weight_reduce_loss (sum / (avg_factor + float32 eps)), float64."""
    n, c, h, w = stu_hold.size()
    s = stu_hold.permute(1, 0, 2, 3).reshape(c, -1)
    s = (s - s.mean(dim=-1, keepdim=True)) / (s.std(dim=-1, keepdim=True) + 1e-6)
    t = tea_hold.permute(1, 0, 2, 3).reshape(c, -1)
    aligned = (s * t.std(dim=-1, keepdim=True) + t.mean(dim=-1, keepdim=True)).reshape(c, n, h, w).permute(1, 0, 2, 3)
    eps = torch.finfo(torch.float32).eps
    target = tea_cls.detach().sigmoid()
    qfl = F.binary_cross_entropy_with_logits(reused_cls, target, reduction="none")
    qfl = qfl * torch.abs(reused_cls.sigmoid() - target).pow(1)
    cls = 0.4 * qfl.sum() / (avg_factor + eps)
    area1 = (reused_boxes[..., 2] - reused_boxes[..., 0]) * (reused_boxes[..., 3] - reused_boxes[..., 1])
    area2 = (tea_boxes[..., 2] - tea_boxes[..., 0]) * (tea_boxes[..., 3] - tea_boxes[..., 1])
    lt = torch.max(reused_boxes[..., :2], tea_boxes[..., :2])
    rb = torch.min(reused_boxes[..., 2:], tea_boxes[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = torch.max(area1 + area2 - overlap, overlap.new_tensor([1e-6]))
    ious = (overlap / union).clamp(min=1e-6)
    weight = tea_cls.max(dim=-1)[0].sigmoid()
    reg = 0.75 * (-ious.log() * weight).sum() / (avg_factor + eps)
    return aligned, cls, reg


def test_crosskd_terms_equal_the_authors_in_values_and_gradients():
    from kd_cli.methods.crosskd import AVG_EPS, align_scale, iou_kd, quality_focal_kd

    g = torch.Generator().manual_seed(0)
    stu_hold = (torch.randn(2, 8, 5, 6, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    tea_hold = torch.randn(2, 8, 5, 6, generator=g, dtype=torch.float64) * 2 - 1
    reused_cls = torch.randn(2, 30, 4, generator=g, dtype=torch.float64).requires_grad_()
    tea_cls = torch.randn(2, 30, 4, generator=g, dtype=torch.float64)
    corner = torch.rand(2, 30, 2, generator=g, dtype=torch.float64) * 20
    reused_boxes = torch.cat([corner, corner + 1 + torch.rand(2, 30, 2, generator=g, dtype=torch.float64) * 10], -1)
    reused_boxes.requires_grad_()
    tea_boxes = torch.cat([corner + 2, corner + 5 + torch.rand(2, 30, 2, generator=g, dtype=torch.float64) * 10], -1)
    tea_boxes[0, 0] = torch.tensor([100.0, 100.0, 110.0, 110.0], dtype=torch.float64)  # no overlap: IoU clamped
    avg = 7.25
    aligned, cls, reg = crosskd_reference(stu_hold, tea_hold, reused_cls, tea_cls, reused_boxes, tea_boxes, avg)
    mine_aligned = align_scale(stu_hold, tea_hold)
    mine_cls = 0.4 * quality_focal_kd(reused_cls, tea_cls, 1.0) / (avg + AVG_EPS)
    mine_reg = 0.75 * iou_kd(reused_boxes, tea_boxes, tea_cls.max(-1).values.sigmoid()) / (avg + AVG_EPS)
    for mine, theirs, leaf in (
        (mine_aligned, aligned, stu_hold),
        (mine_cls, cls, reused_cls),
        (mine_reg, reg, reused_boxes),
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
        weights = torch.randn_like(theirs)
        (g_mine,) = torch.autograd.grad((mine * weights).sum(), leaf)
        (g_theirs,) = torch.autograd.grad((theirs * weights).sum(), leaf)
        torch.testing.assert_close(g_mine, g_theirs, rtol=1e-12, atol=1e-12)


def test_crosskds_avg_factor_is_the_centerness_of_fcos_matched_locations():
    from torchvision.models.detection._utils import BoxLinearCoder

    from kd_cli.methods.crosskd import centerness_sum

    anchors = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0], [0.0, 8.0, 8.0, 16.0]]])
    targets = [{"boxes": torch.tensor([[2.0, 1.0, 14.0, 9.0]]), "labels": torch.tensor([0])}]
    matched = [torch.tensor([0, 0, -1])]
    # centres (4, 4) and (12, 4): distances l t r b = (2, 3, 10, 5) and (10, 3, 2, 5)
    expected = 2 * (2 / 10 * 3 / 5) ** 0.5
    assert float(centerness_sum(targets, matched, anchors, BoxLinearCoder(True))) == pytest.approx(expected)
    assert float(centerness_sum(targets, [torch.tensor([-1, -1, -1])], anchors, BoxLinearCoder(True))) == pytest.approx(
        1e-6
    )


def test_crosskd_sends_its_gradient_through_the_frozen_teacher_head_and_refuses_other_heads():
    teacher = create_model("kd_fcos", 4, 1, 48, width=8).eval()
    student = create_model("kd_fcos_tiny", 4, 1, 48)
    method = build_method(config("crosskd", pkd_weight=2.0), student, teacher, task="detection")
    student.train()
    targets = [{"boxes": torch.tensor([[6.0, 8.0, 30.0, 40.0]]), "labels": torch.tensor([2])}] * 2
    _, terms = method(torch.randn(2, 1, 48, 48), targets)
    assert {"det_classification", "crosskd_cls", "crosskd_reg", "pkd"} <= set(terms)
    terms["crosskd_cls"].backward()
    assert student.detector.head.classification_head.conv[0].weight.grad.abs().sum() > 0  # through the crossing
    assert student.detector.head.classification_head.cls_logits.weight.grad is None  # its own head: det losses only
    assert all(p.grad is None for p in teacher.parameters())
    assert not hasattr(student.detector.head, "__dict__") or "compute_loss" not in student.detector.head.__dict__
    with pytest.raises(KdError, match="reused_teacher_head_idx=2.*give 0..1"):
        build_method(config("crosskd", reused_teacher_head_idx=2), student, teacher, task="detection")
    rcnn = create_model("fasterrcnn_mobilenet_v3_large_fpn", 4, 1, 64)
    with pytest.raises(KdError, match="student is a FasterRCNN.*pick FCOS detectors"):
        build_method(config("crosskd"), rcnn, create_model("fasterrcnn_resnet50_fpn", 4, 1, 64), task="detection")


@pytest.mark.slow  # a torchrun launch of two CPU processes (~30 s)
def test_torchrun_ddp_trains_a_detector_on_shards_and_scores_the_whole_split(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "ddp"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*torchrun, "-m", "kd_cli", "train-teacher", *TEACHER[:3], *TEACHER[3:5], "trainer.epochs=2"]
        + [*TEACHER[6:], f"paths.outputs={tmp_path}", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    s = summary(run)
    assert s["status"] == "complete" and json.loads((run / "env.json").read_text())["world_size"] == 2
    evaluated = tmp_path / "eval"
    kd_here_ok("evaluate", f"run={run}", *FAST, f"hydra.run.dir={evaluated}", cwd=tmp_path)
    assert summary(evaluated)["map"] == pytest.approx(s["last_map"], abs=1e-6)  # rank 0 scored all 64 scenes


# --- ROI-head KD -------------------------------------------------------------------------------------


def test_roi_kd_is_hintons_kd_on_the_teachers_roi_head_run_on_the_students_proposals():
    torch.manual_seed(0)
    teacher = create_model("fasterrcnn_resnet50_fpn", 3, 1, 64).eval()
    student = create_model("fasterrcnn_mobilenet_v3_large_fpn", 3, 1, 64)
    method = build_method(config("roi_kd", temperature=2.0), student, teacher, task="detection")
    student.train()
    seen = {}
    student.detector.roi_heads.box_roi_pool.register_forward_pre_hook(lambda m, a: seen.update(proposals=a[1]))
    student.detector.roi_heads.box_predictor.register_forward_hook(lambda m, a, out: seen.update(logits=out[0]))
    targets = [{"boxes": torch.tensor([[6.0, 8.0, 40.0, 50.0]]), "labels": torch.tensor([2])}] * 2
    images = torch.randn(2, 1, 64, 64)
    _, terms = method(images, targets)
    with torch.no_grad():  # the teacher's head on the same proposals, by hand, in float64
        levels = teacher.detector.backbone(images.repeat(1, 3, 1, 1))
        heads = teacher.detector.roi_heads
        pooled = heads.box_roi_pool(levels, seen["proposals"], [(64, 64), (64, 64)])
        t = heads.box_predictor(heads.box_head(pooled))[0].double()
    s = seen["logits"].double()
    p_t = torch.softmax(t / 2, 1)
    expected = 4 * (p_t * (p_t.log() - torch.log_softmax(s / 2, 1))).sum(1).mean()
    assert len(seen["proposals"][0]) > 0 and terms["roi_kd"].item() == pytest.approx(float(expected), rel=1e-5)
    terms["roi_kd"].backward()
    assert student.detector.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(KdError, match="student is a FCOS.*pick Faster R-CNN"):
        build_method(
            config("roi_kd"),
            create_model("kd_fcos_tiny", 3, 1, 64),
            create_model("kd_fcos", 3, 1, 64),
            task="detection",
        )


# --- dense-head KD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", [("kd_fcos_tiny", "kd_fcos"), ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn")])
def test_head_kd_pulls_the_students_class_logits_to_the_teachers_at_every_location(pair):
    from kd_cli.methods.crosskd import quality_focal_kd

    torch.manual_seed(0)
    student, teacher = create_model(pair[0], 3, 1, 64), create_model(pair[1], 3, 1, 64).eval()
    method = build_method(config("head_kd", beta=2.0), student, teacher, task="detection")
    student.train()
    seen = {}
    original = student.detector.head.compute_loss

    def spy(targets, head_outputs, anchors, matched):
        seen.update(logits=head_outputs["cls_logits"], matched=matched)
        return original(targets, head_outputs, anchors, matched)

    student.detector.head.compute_loss = spy
    images = torch.randn(2, 1, 64, 64)
    targets = [{"boxes": torch.tensor([[6.0, 8.0, 40.0, 50.0]]), "labels": torch.tensor([2])}] * 2
    _, terms = method(images, targets)
    with torch.no_grad():
        shaped = images.repeat(1, teacher.repeat, 1, 1)
        teacher_logits = teacher.detector.head(list(teacher.detector.backbone(shaped).values()))["cls_logits"]
    foreground = sum(int((m >= 0).sum()) for m in seen["matched"])
    assert foreground > 0
    expected = quality_focal_kd(seen["logits"].double(), teacher_logits.double(), 2.0) / foreground
    assert float(terms["head_kd"]) == pytest.approx(float(expected), rel=1e-5)
    assert student.detector.head.compute_loss is spy  # kd put back what it found
    with pytest.raises(KdError, match="student is a FasterRCNN.*RetinaNet or FCOS"):
        build_method(
            config("head_kd"),
            create_model("fasterrcnn_mobilenet_v3_large_fpn", 3, 1, 64),
            create_model("fasterrcnn_mobilenet_v3_large_fpn", 3, 1, 64),
            task="detection",
        )


def test_a_torchvision_detectors_pretrained_backbone_loads_imagenet_weights_or_says_it_is_offline(monkeypatch):
    import urllib.error

    import torchvision

    reference = torchvision.models.mobilenet_v3_large().state_dict()
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: reference)
    model = create_model("fasterrcnn_mobilenet_v3_large_fpn", 3, 1, 64, pretrained_backbone=True)
    body = model.detector.backbone.body.state_dict()
    assert torch.equal(body["0.0.weight"], reference["features.0.0.weight"])

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(
        KdError, match="could not load the ImageNet backbone weights of fasterrcnn_mobilenet_v3_large_fpn"
    ):
        create_model("fasterrcnn_mobilenet_v3_large_fpn", 3, 1, 64, pretrained_backbone=True)
