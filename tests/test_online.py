"""Online distillation (DML): several students optimised in the one loop, each evaluated every epoch
and saved as its own model in the run. The mutual loss against a float64 reference from the paper's
equation, its gradient reaching each student from its own terms only, and the CLI end to end:
the peers' metrics, files, summary, `kd evaluate` on a peer, a resumed cohort, and the stages that
cannot train a cohort refusing it."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_cli.errors import KdError
from kd_cli.methods import build_method
from kd_cli.methods.dml import mutual_loss
from kd_cli.models import create_model
from kdrun import FAST, assert_one_line_error, kd, summary

DML = {"name": "dml", "students": 3, "ce_weight": 1.0, "dml_weight": 1.0, "temperature": 1.0}


def ref_mutual(own: np.ndarray, others: list[np.ndarray], temperature: float) -> float:
    """mean over the others of T^2 * (1/B) sum_i KL(p_other,i || p_own,i), p = softmax(z / T)."""
    def softmax(z):
        e = np.exp(z / temperature - (z / temperature).max())
        return e / e.sum()

    total = 0.0
    for other in others:
        kl = sum(sum(q * math.log(q / p) for q, p in zip(softmax(o), softmax(s))) for s, o in zip(own, other))
        total += temperature**2 * kl / len(own)
    return total / len(others)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_the_mutual_loss_is_the_papers_mean_kl_to_the_other_students(temperature):
    generator = np.random.default_rng(0)
    own, others = generator.normal(size=(4, 5)), [generator.normal(size=(4, 5)) for _ in range(2)]
    value = mutual_loss(torch.from_numpy(own), [torch.from_numpy(o) for o in others], temperature).item()
    assert value == pytest.approx(ref_mutual(own, others, temperature), rel=1e-10)
    own_t = torch.from_numpy(own).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: mutual_loss(z, [torch.from_numpy(o) for o in others], temperature),
                                    (own_t,), eps=1e-6, atol=1e-6)


def test_each_student_learns_from_its_own_terms_only():
    torch.manual_seed(0)
    method = build_method(DML, create_model("cnn", 10, 1, 8, width=4), None,
                          new_student=lambda: create_model("cnn", 10, 1, 8, width=4))
    peers = method.peer_models()
    assert list(peers) == ["peer1", "peer2"]
    assert all(p is not method.student for p in peers.values())
    assert not torch.equal(next(peers["peer1"].parameters()), next(method.student.parameters()))  # own init
    logits, terms = method(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    assert set(terms) == {"ce", "dml", "peer1_ce", "peer1_dml", "peer2_ce", "peer2_dml"}
    terms["dml"].backward()  # the student's mutual term: the peers' outputs are its fixed targets
    assert all(p.grad is not None for p in method.student.parameters())
    assert all(p.grad is None for peer in peers.values() for p in peer.parameters())
    assert all(k.startswith("peers.") for k in method.extra_state())  # the cohort is in the resume checkpoint


def test_a_cohort_of_one_and_a_stage_without_students_to_spare_are_refused():
    student = create_model("mlp", 10, 1, 8)
    with pytest.raises(KdError, match="method.students=1 must be"):
        build_method({**DML, "students": 1}, student, None, new_student=lambda: create_model("mlp", 10, 1, 8))
    with pytest.raises(KdError, match="method=dml trains several students at once; it runs in kd distill only"):
        build_method(DML, student, None)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dml")
    result = kd("distill", "method=dml", "method.students=3", "student=cnn", "student.kwargs.width=4", "trainer.epochs=2",
                "trainer.precision=fp32", *FAST, f"paths.outputs={out}", f"hydra.run.dir={out / 'run'}", cwd=out)
    assert result.code == 0, result.stderr[-3000:]
    return out / "run"


def test_every_student_is_scored_logged_and_saved(cohort):
    done = summary(cohort)
    assert done["status"] == "complete" and done["method"] == "dml" and done.get("teacher_arch") is None
    assert set(done["peers"]) == {"peer1", "peer2"}
    with open(cohort / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    for name in ("", "peer1_", "peer2_"):
        for column in (f"train_{name}ce", f"train_{name}dml", f"{name}test_top1"):
            assert all(math.isfinite(float(row[column])) for row in rows), column
    for name, peer in done["peers"].items():
        assert peer["path"] == f"peers/{name}" and (cohort / peer["path"] / "model.safetensors").is_file()
        assert peer["last_top1"] == pytest.approx(float(rows[-1][f"{name}_test_top1"]))
        assert json.loads((cohort / peer["path"] / "model.json").read_text())["arch"] == "cnn"


def test_kd_evaluate_scores_a_peer_as_its_own_model(cohort, tmp_path):
    result = kd("evaluate", f"run={cohort / 'peers' / 'peer2'}", f"paths.outputs={tmp_path}",
                f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.code == 0, result.stderr[-3000:]
    assert summary(tmp_path / "eval")["top1"] == pytest.approx(summary(cohort)["peers"]["peer2"]["last_top1"], abs=1e-6)


def test_a_stopped_cohort_resumes_every_student(cohort, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cohort, run)
    (run / "summary.json").write_text(json.dumps({**summary(run), "status": "interrupted"}))
    result = kd("distill", f"resume={run}", "trainer.epochs=3", "resume_extend=true", cwd=tmp_path)
    assert result.code == 0, result.stderr[-3000:]
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert summary(run)["peers"]["peer2"]["last_top1"] == pytest.approx(float(rows[-1]["peer2_test_top1"]))


def test_kd_compress_refuses_a_cohort_in_one_line_before_writing(cohort, tmp_path):
    result = kd("compress", f"run={cohort}", "method=dml", "compression=prune_quantize", f"paths.outputs={tmp_path}",
                cwd=tmp_path)
    assert_one_line_error(result, "method=dml trains several students", "kd distill only")
    assert not list(tmp_path.glob("compress/*/*"))


@pytest.mark.slow
def test_every_student_of_a_dml_cohort_beats_the_student_trained_alone_on_digits(tmp_path):
    """The issue's bar, on scikit-learn's digits: the method table's student (cnn, width 4), fp32, 3 seeds;
    a cohort of three, each student's test top-1 (last epoch, mean over seeds) above `method=none`'s."""
    seeds = [0, 1, 2]
    common = [f"seed={','.join(map(str, seeds))}", "student=cnn", "student.kwargs.width=4", "trainer.precision=fp32",
              *FAST, f"paths.outputs={tmp_path}"]
    for method in (["method=none"], ["method=dml", "method.students=3"]):
        result = kd("distill", "-m", *method, *common, f"hydra.sweep.dir={tmp_path / method[0][7:]}",
                    "hydra.sweep.subdir=${seed}", cwd=tmp_path, timeout=3000)
        assert result.code == 0, result.stderr[-3000:]
    alone = [summary(tmp_path / "none" / str(seed))["last_top1"] for seed in seeds]
    cohorts = [summary(tmp_path / "dml" / str(seed)) for seed in seeds]
    students = {"student": [c["last_top1"] for c in cohorts],
                **{name: [c["peers"][name]["last_top1"] for c in cohorts] for name in ("peer1", "peer2")}}
    print(f"\nnone {alone}: mean {np.mean(alone):.2f}")
    for name, scores in students.items():
        print(f"dml {name} {scores}: mean {np.mean(scores):.2f} ({np.mean(scores) - np.mean(alone):+.2f})")
    assert all(np.mean(scores) > np.mean(alone) for scores in students.values()), students
