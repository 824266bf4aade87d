"""`method=ensemble`: the averaged softened outputs match the formula, and on real digits an
ensemble of two different teachers teaches better than the weaker of them alone."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kdrun import FAST, assert_one_line_error, kd_here, kd_ok, summary

from kd_cli.errors import KdError
from kd_cli.methods.ensemble import ensemble_probabilities, normalised_weights
from kd_cli.methods.logit_utils import kd_loss


def test_ensemble_target_is_the_weighted_mean_of_softened_outputs():
    torch.manual_seed(0)
    a, b, student = (torch.randn(5, 7, dtype=torch.float64) for _ in range(3))
    T = 3.0
    p = ensemble_probabilities([a, b], [0.25, 0.75], T)
    expected = 0.25 * F.softmax(a.float() / T, 1) + 0.75 * F.softmax(b.float() / T, 1)
    assert torch.allclose(p, expected)
    # KD against T*log(p) is KL(p || softmax(s/T)) * T^2, averaged over the batch
    loss = kd_loss(student.float(), T * p.log(), T)
    log_q = F.log_softmax(student.float() / T, 1)
    reference = (p * (p.log() - log_q)).sum(1).mean() * T**2
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_weights_are_checked_and_normalised():
    assert normalised_weights(None, 2) == [0.5, 0.5]
    assert normalised_weights([1, 3], 2) == [0.25, 0.75]
    for bad in ([1], [-1, 2], [0, 0]):
        with pytest.raises(KdError):
            normalised_weights(bad, 2)


def sweep_scores(outputs: Path) -> list[float]:
    sweep = sorted((outputs / "multirun").glob("*/*"))[-1]
    return [summary(sweep / str(job))["last_top1"] for job in range(3)]


@pytest.mark.slow
def test_two_teachers_teach_better_than_the_weaker_alone(tmp_path):
    teachers = {"cnn": tmp_path / "cnn", "mlp": tmp_path / "mlp"}
    kd_ok("train-teacher", *FAST, f"hydra.run.dir={teachers['cnn']}", cwd=tmp_path)
    kd_ok(
        "train-teacher",
        "teacher=mlp",
        "teacher.kwargs.hidden=[128]",
        *FAST,
        f"hydra.run.dir={teachers['mlp']}",
        cwd=tmp_path,
    )
    accuracy = {name: summary(path)["last_top1"] for name, path in teachers.items()}
    weaker = min(accuracy, key=accuracy.get)
    single_out, ensemble_out = tmp_path / "single", tmp_path / "ensemble"
    kd_ok(
        "distill",
        "-m",
        "seed=0,1,2",
        f"teacher.checkpoint={teachers[weaker]}",
        *FAST,
        f"paths.outputs={single_out}",
        cwd=tmp_path,
    )
    kd_ok(
        "distill",
        "-m",
        "seed=0,1,2",
        "method=ensemble",
        f"method.teachers=[{teachers['cnn']},{teachers['mlp']}]",
        *FAST,
        f"paths.outputs={ensemble_out}",
        cwd=tmp_path,
    )
    single, ensemble = sweep_scores(single_out), sweep_scores(ensemble_out)
    print(f"\nteachers {accuracy}; kd from {weaker}: {single}; ensemble: {ensemble}")
    assert statistics.mean(ensemble) > statistics.mean(single)


def test_ensemble_needs_teachers(tmp_path):
    assert_one_line_error(kd_here("distill", "method=ensemble", *FAST, cwd=tmp_path), "method.teachers")
