"""The detection bar, on real digits through the real CLI: on scenes of the real MNIST test set (split 7,000 /
3,000 digits in MNIST's own IDX files, read by torchvision's MNIST class; scikit-learn's digits where those
files are not beside the repository), two FPN methods, PKD and MGD, and the head method CrossKD, from a
kd_fcos teacher each beat the kd_fcos_tiny student trained alone by at least one COCO AP point (AP@[.5:.95],
pycocotools' COCOeval), mean of three seeds."""

from __future__ import annotations

import statistics

import pytest
from formats import MNIST_T10K, load_mnist_t10k, write_mnist_raw
from kdrun import FAST, kd_ok, summary

SEEDS = (0, 1, 2)
# experiment=digit_detection's recipe (20 epochs, batch 32, SGD lr 0.01, weight decay 1e-4, clip 10) on 1,000
# training scenes, scored once, after the last epoch. (Shorter runs do not show the gain: with 600 scenes and
# 12 epochs at batch 16 the student alone reached 17.8 mAP and PKD 11.3, MGD 12.9 on seed 0: the feature terms
# slow the first epochs down before they pay.)
RECIPE = [
    "dataset.train_scenes=1000",
    "dataset.test_scenes=300",
    "dataset.aug_seed=0",  # the seeds differ in the student's initialisation only
    "trainer.epochs=20",
    "trainer.eval_every=20",
    "trainer.batch_size=32",
    "optim.lr=0.01",
    "optim.weight_decay=1e-4",
    "trainer.grad_clip=10",
    *FAST,
]
METHODS = {"pkd": ["method=pkd"], "mgd": ["method=mgd", "method.alpha_mgd=0.002"], "crosskd": ["method=crosskd"]}


def scenes(tmp_path) -> list[str]:
    """MNIST scenes where the real test set is at hand, the digit scenes otherwise."""
    if not MNIST_T10K.is_dir():
        return ["dataset=digit_detection"]
    images, labels = load_mnist_t10k()
    write_mnist_raw(tmp_path / "data", images, labels, n_train=7000)
    return [
        "dataset=mnist_detection",
        "dataset.canvas=48",
        "dataset.digit_scale=0.6",
        f"paths.data={tmp_path / 'data'}",
    ]


@pytest.mark.slow
def test_pkd_mgd_and_crosskd_beat_the_detector_alone_by_one_ap_point(tmp_path):
    setting = [*scenes(tmp_path), *RECIPE, f"paths.outputs={tmp_path}"]
    kd_ok("train-teacher", *setting, f"hydra.run.dir={tmp_path / 'teacher'}", cwd=tmp_path)
    teacher = summary(tmp_path / "teacher")["last_map"]
    weights = f"teacher.checkpoint={tmp_path / 'teacher' / 'model.safetensors'}"
    scores: dict[str, list[float]] = {name: [] for name in ("none", *METHODS)}
    for name, options in {"none": ["method=none"], **METHODS}.items():
        for seed in SEEDS:
            run = tmp_path / f"{name}-{seed}"
            kd_ok(
                "distill",
                *setting,
                *options,
                weights,
                f"seed={seed}",
                f"hydra.run.dir={run}",
                cwd=tmp_path,
            )
            scores[name].append(summary(run)["last_map"])
    alone = statistics.mean(scores["none"])
    gains = {name: statistics.mean(scores[name]) - alone for name in METHODS}
    print(f"teacher {teacher:.2f} mAP; alone {scores['none']}; " + "; ".join(f"{n} {scores[n]}" for n in METHODS))
    assert teacher > alone + 10, (teacher, alone)  # a teacher clearly better than the student
    assert all(gain >= 1.0 for gain in gains.values()), gains
