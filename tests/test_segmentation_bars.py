"""The segmentation bar, on real digits through the real CLI: on scenes composed of the real MNIST test
set (split 7,000 / 3,000 digits in MNIST's own IDX files, read by torchvision's MNIST class), channel-wise
distillation (`method=cwd`) from a segcnn teacher beats the segcnn_tiny student trained alone by at least
one mIoU point, mean of three seeds. (Pixel-wise KD does not meet that bar on this pair yet: +0.93, see
the README's Results; it is left out here to keep CI's time.)"""

from __future__ import annotations

import statistics

import pytest
from formats import MNIST_T10K, load_mnist_t10k, write_mnist_raw
from kdrun import FAST, kd_ok, summary

SEEDS = (0, 1, 2)
SCENES = [
    "dataset=mnist_scenes",
    "dataset.train_scenes=2000",
    "dataset.test_scenes=500",
    "dataset.canvas=48",
    "dataset.digits_per_scene=2",
    "optim=adamw",
    "optim.lr=3e-3",
    "optim.weight_decay=1e-4",
    "trainer.epochs=15",
    *FAST,
]


@pytest.mark.slow
@pytest.mark.skipif(not MNIST_T10K.is_dir(), reason="real MNIST test files not found beside the repository")
def test_cwd_beats_the_segmenter_alone_on_mnist_scenes(tmp_path):
    images, labels = load_mnist_t10k()
    write_mnist_raw(tmp_path / "data", images, labels, n_train=7000)
    setting = [*SCENES, f"paths.data={tmp_path / 'data'}", f"paths.outputs={tmp_path}"]
    kd_ok("train-teacher", *setting, f"hydra.run.dir={tmp_path / 'teacher'}", cwd=tmp_path)
    teacher = summary(tmp_path / "teacher")["last_miou"]
    scores: dict[str, list[float]] = {"none": [], "cwd": []}
    for method, runs in scores.items():
        for seed in SEEDS:
            run = tmp_path / f"{method}-{seed}"
            kd_ok(
                "distill",
                *setting,
                f"method={method}",
                f"seed={seed}",
                f"teacher.checkpoint={tmp_path / 'teacher'}",
                f"hydra.run.dir={run}",
                cwd=tmp_path,
            )
            runs.append(summary(run)["last_miou"])
    means = {method: statistics.mean(runs) for method, runs in scores.items()}
    print(f"\nteacher {teacher:.2f}; " + "; ".join(f"{m} {scores[m]} mean {means[m]:.2f}" for m in scores))
    assert teacher > means["none"] + 10, "the teacher is not clearly better than the student"
    gain = means["cwd"] - means["none"]
    assert gain >= 1.0, f"cwd gains only {gain:.2f} mIoU points over none: {scores}"
