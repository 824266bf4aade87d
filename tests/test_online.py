"""Online distillation (DML, ONE): several students optimised in the one loop, each evaluated every epoch
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
from kdrun import FAST, assert_one_line_error, kd, kd_here, summary

from kd_cli.errors import KdError
from kd_cli.methods import build_method
from kd_cli.methods.dml import mutual_loss
from kd_cli.methods.logit_utils import kd_loss
from kd_cli.methods.one import one_losses
from kd_cli.models import create_model

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
    assert torch.autograd.gradcheck(
        lambda z: mutual_loss(z, [torch.from_numpy(o) for o in others], temperature), (own_t,), eps=1e-6, atol=1e-6
    )


def test_each_student_learns_from_its_own_terms_only():
    torch.manual_seed(0)
    method = build_method(
        DML, create_model("cnn", 10, 1, 8, width=4), None, new_student=lambda: create_model("cnn", 10, 1, 8, width=4)
    )
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
    with pytest.raises(KdError, match="method=dml trains several students at once; kd compress fine-tunes one model"):
        build_method(DML, student, None)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dml")
    result = kd_here(
        "distill",
        "method=dml",
        "method.students=3",
        "student=cnn",
        "student.kwargs.width=4",
        "trainer.epochs=2",
        "trainer.precision=fp32",
        *FAST,
        f"paths.outputs={out}",
        f"hydra.run.dir={out / 'run'}",
        cwd=out,
    )
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
    result = kd_here(
        "evaluate",
        f"run={cohort / 'peers' / 'peer2'}",
        f"paths.outputs={tmp_path}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr[-3000:]
    assert summary(tmp_path / "eval")["top1"] == pytest.approx(summary(cohort)["peers"]["peer2"]["last_top1"], abs=1e-6)


def test_a_stopped_cohort_resumes_every_student(cohort, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cohort, run)
    (run / "summary.json").write_text(json.dumps({**summary(run), "status": "interrupted"}))
    result = kd_here("distill", f"resume={run}", "trainer.epochs=3", "resume_extend=true", cwd=tmp_path)
    assert result.code == 0, result.stderr[-3000:]
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert summary(run)["peers"]["peer2"]["last_top1"] == pytest.approx(float(rows[-1]["peer2_test_top1"]))


def test_kd_compress_refuses_a_cohort_in_one_line_before_writing(cohort, tmp_path):
    result = kd_here(
        "compress",
        f"run={cohort}",
        "method=dml",
        "compression=prune_quantize",
        f"paths.outputs={tmp_path}",
        cwd=tmp_path,
    )
    assert_one_line_error(result, "method=dml trains several students", "use it in kd distill or kd train-teacher")
    assert not list(tmp_path.glob("compress/*/*"))


@pytest.mark.slow
def test_every_student_of_a_dml_cohort_beats_the_student_trained_alone_on_digits(tmp_path):
    """The issue's bar, on scikit-learn's digits: the method table's student (cnn, width 4), fp32, 3 seeds;
    a cohort of three, each student's test top-1 (last epoch, mean over seeds) above `method=none`'s."""
    seeds = [0, 1, 2]
    common = [
        f"seed={','.join(map(str, seeds))}",
        "student=cnn",
        "student.kwargs.width=4",
        "trainer.precision=fp32",
        *FAST,
        f"paths.outputs={tmp_path}",
    ]
    for method in (["method=none"], ["method=dml", "method.students=3"]):
        result = kd(
            "distill",
            "-m",
            *method,
            *common,
            f"hydra.sweep.dir={tmp_path / method[0][7:]}",
            "hydra.sweep.subdir=${seed}",
            cwd=tmp_path,
            timeout=3000,
        )
        assert result.code == 0, result.stderr[-3000:]
    alone = [summary(tmp_path / "none" / str(seed))["last_top1"] for seed in seeds]
    cohorts = [summary(tmp_path / "dml" / str(seed)) for seed in seeds]
    students = {
        "student": [c["last_top1"] for c in cohorts],
        **{name: [c["peers"][name]["last_top1"] for c in cohorts] for name in ("peer1", "peer2")},
    }
    print(f"\nnone {alone}: mean {np.mean(alone):.2f}")
    for name, scores in students.items():
        print(f"dml {name} {scores}: mean {np.mean(scores):.2f} ({np.mean(scores) - np.mean(alone):+.2f})")
    assert all(np.mean(scores) > np.mean(alone) for scores in students.values()), students


# ---------------------------------------------------------------- ONE: branches on one shared trunk

ONE = {"name": "one", "branches": 3, "ce_weight": 1.0, "ensemble_weight": 1.0, "one_weight": 1.0, "temperature": 3.0}


def ref_one(branches: list[np.ndarray], gate: np.ndarray, labels: np.ndarray, temperature: float):
    """Lan et al.'s terms, float64 loops: z_e = sum_i g_i z_i; CE of each branch and of z_e; T^2 KL(p_e || p_i)."""

    def softmax(z, t=1.0):
        e = np.exp(z / t - (z / t).max())
        return e / e.sum()

    batch = len(labels)
    ensemble = np.array([sum(gate[b, i] * branches[i][b] for i in range(len(branches))) for b in range(batch)])
    ce = [sum(-math.log(softmax(z[b])[labels[b]]) for b in range(batch)) / batch for z in branches]
    ensemble_ce = sum(-math.log(softmax(ensemble[b])[labels[b]]) for b in range(batch)) / batch
    kl = [
        temperature**2
        * sum(
            q * math.log(q / p)
            for b in range(batch)
            for q, p in zip(softmax(ensemble[b], temperature), softmax(z[b], temperature))
        )
        / batch
        for z in branches
    ]
    return ce, ensemble_ce, kl


def one_model(name: str = "cnn", **kwargs):
    shape = (1, 8) if name == "cnn" else (3, 32)
    build = lambda: create_model(name, 10, shape[0], shape[1], **kwargs)  # noqa: E731
    torch.manual_seed(0)
    return build_method(ONE, build(), None, new_student=build), shape


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_one_terms_match_the_papers_gated_ensemble(temperature):
    generator = np.random.default_rng(1)
    branches = [generator.normal(size=(4, 5)) for _ in range(3)]
    gate = generator.dirichlet(np.ones(3), size=4)
    labels = np.array([0, 3, 4, 1])
    ce, ensemble_ce, kl = one_losses(
        [torch.from_numpy(z) for z in branches], torch.from_numpy(gate), torch.from_numpy(labels), temperature
    )
    want_ce, want_ensemble, want_kl = ref_one(branches, gate, labels, temperature)
    assert [c.item() for c in ce] == pytest.approx(want_ce, rel=1e-10)
    assert ensemble_ce.item() == pytest.approx(want_ensemble, rel=1e-10)
    assert [k.item() for k in kl] == pytest.approx(want_kl, rel=1e-10)
    inputs = [torch.from_numpy(z).requires_grad_(True) for z in branches] + [
        torch.from_numpy(gate).requires_grad_(True)
    ]

    def cross_entropies(*tensors):
        ce, ensemble_ce, _ = one_losses(list(tensors[:3]), tensors[3], torch.from_numpy(labels), temperature)
        return sum(ce) + ensemble_ce

    assert torch.autograd.gradcheck(cross_entropies, tuple(inputs), eps=1e-6, atol=1e-6)
    # the KL terms take the ensemble as a fixed target: d/dz_i T^2 KL(p_e || p_i) = T (p_i - p_e) / B, no gate gradient
    _, _, kl = one_losses(inputs[:3], inputs[3], torch.from_numpy(labels), temperature)
    kl[1].backward()
    ensemble = sum(inputs[3][:, i : i + 1].detach() * inputs[i].detach() for i in range(3))
    expected = (
        temperature
        * (torch.softmax(inputs[1].detach() / temperature, 1) - torch.softmax(ensemble / temperature, 1))
        / 4
    )
    assert torch.allclose(inputs[1].grad, expected, atol=1e-12)
    assert inputs[3].grad is None and inputs[0].grad is None


@pytest.mark.parametrize("arch", ["cnn", "resnet8", "wrn_16_2", "mobilenetv2", "vgg8"])
def test_one_branches_share_the_trunk_and_own_their_heads(arch):
    method, shape = one_model(arch)
    student, peers = method.student, method.peer_models()
    assert list(peers) == ["branch2", "branch3"]
    for peer in peers.values():
        shared = {id(p) for p in student.parameters()} & {id(p) for p in peer.parameters()}
        own = [p for p in peer.parameters() if id(p) not in shared]
        assert shared and own  # the trunk is the student's, the head its own
        name = next(n for n, p in peer.named_parameters() if id(p) not in shared and p.dim() > 1)  # a conv/linear
        assert not torch.equal(dict(peer.named_parameters())[name], dict(student.named_parameters())[name])  # own init
    method.train()
    images, labels = torch.randn(4, shape[0], shape[1], shape[1]), torch.randint(0, 10, (4,))
    _, terms = method(images, labels)
    assert set(terms) == {"ce", "one", "branch2_ce", "branch2_one", "branch3_ce", "branch3_one", "ensemble_ce"}
    tracked = {int(m.num_batches_tracked) for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert tracked == {1}  # the trunk ran once for three branches; each head once


def test_one_runs_the_trunk_once_with_the_same_values_and_gradients_as_three_runs(monkeypatch):
    from kd_cli.methods import one

    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    results = []
    for memoised in (True, False):
        method, _ = one_model("cnn")
        method.train()
        if not memoised:
            monkeypatch.setattr(one.SharedTrunk, "__enter__", lambda self: self)
            monkeypatch.setattr(one.SharedTrunk, "__exit__", lambda self, *exc: None)
        logits, terms = method(images, labels)
        sum(terms.values()).backward()
        results.append(
            (
                logits.detach(),
                {k: v.item() for k, v in terms.items()},
                {n: p.grad.clone() for n, p in method.named_parameters()},
            )
        )
    (logits_a, terms_a, grads_a), (logits_b, terms_b, grads_b) = results
    assert torch.allclose(logits_a, logits_b) and terms_a == pytest.approx(terms_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_a_branchs_terms_train_the_trunk_and_its_own_head_only():
    method, _ = one_model("cnn")
    method.train()
    _, terms = method(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    terms["branch2_ce"].backward()
    peer_only = {id(p) for p in method.peers[0].parameters()} - {id(p) for p in method.student.parameters()}
    trunk = {id(p) for p in method.peers[0].parameters()} & {id(p) for p in method.student.parameters()}
    for p in method.parameters():
        assert (p.grad is not None) == (id(p) in peer_only | trunk)


def test_one_gate_takes_a_batch_of_one_and_bad_students_are_refused():
    method, _ = one_model("cnn")
    method.train()
    logits, terms = method(torch.randn(1, 1, 8, 8), torch.tensor([3]))
    assert logits.shape == (1, 10) and all(torch.isfinite(t) for t in terms.values())
    with pytest.raises(KdError, match="has 1 stage"):
        build_method(ONE, create_model("mlp", 10, 1, 8), None, new_student=lambda: create_model("mlp", 10, 1, 8))
    with pytest.raises(KdError, match="method.branches=1 must be"):
        build_method(
            {**ONE, "branches": 1},
            create_model("cnn", 10, 1, 8),
            None,
            new_student=lambda: create_model("cnn", 10, 1, 8),
        )
    with pytest.raises(KdError, match="method=one trains several students at once; kd compress fine-tunes one model"):
        build_method(ONE, create_model("cnn", 10, 1, 8), None)


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    result = kd_here(
        "distill",
        "method=one",
        "student=cnn",
        "student.kwargs.width=4",
        "trainer.epochs=2",
        "trainer.precision=fp32",
        *FAST,
        f"paths.outputs={out}",
        f"hydra.run.dir={out / 'run'}",
        cwd=out,
    )
    assert result.code == 0, result.stderr[-3000:]
    return out / "run"


def test_one_logs_every_branch_saves_each_and_evaluates_one(one_run, tmp_path):
    done = summary(one_run)
    assert done["status"] == "complete" and done["method"] == "one" and set(done["peers"]) == {"branch2", "branch3"}
    with open(one_run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    for column in ("train_ce", "train_one", "train_ensemble_ce", "train_branch3_one", "branch2_test_top1"):
        assert all(math.isfinite(float(row[column])) for row in rows), column
    result = kd_here(
        "evaluate",
        f"run={one_run / 'peers' / 'branch3'}",
        f"paths.outputs={tmp_path}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr[-3000:]
    assert summary(tmp_path / "eval")["top1"] == pytest.approx(done["peers"]["branch3"]["last_top1"], abs=1e-6)


def test_a_stopped_one_run_resumes_with_its_shared_trunk(one_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_run, run)
    (run / "summary.json").write_text(json.dumps({**summary(run), "status": "interrupted"}))
    result = kd_here("distill", f"resume={run}", "trainer.epochs=3", "resume_extend=true", cwd=tmp_path)
    assert result.code == 0, result.stderr[-3000:]
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert summary(run)["peers"]["branch2"]["last_top1"] == pytest.approx(float(rows[-1]["branch2_test_top1"]))


def test_without_the_ensembles_term_one_has_no_gate_and_teaches_the_branches_mean():
    torch.manual_seed(0)
    build = lambda: create_model("cnn", 10, 1, 8)  # noqa: E731
    method = build_method({**ONE, "ensemble_weight": 0.0}, build(), None, new_student=build)
    assert method.gate is None and not any(n.startswith("gate.") for n, _ in method.named_parameters())
    method.train()
    images, labels = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    logits, terms = method(images, labels)
    branches = [logits, *(peer(images) for peer in method.peers)]
    mean = sum(branches) / 3
    assert terms["one"].item() == pytest.approx(kd_loss(logits, mean.detach(), 3.0).item(), rel=1e-5)


@pytest.mark.parametrize("method", ["dml", "one"])
def test_online_methods_run_on_cifar_shaped_data_and_save_every_student(method, tmp_path):
    """The CIFAR-shaped synthetic pair: a 32x32 RGB resnet8 cohort (DML) and resnet8 branches (ONE)."""
    synthetic = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_test=32", "trainer.batch_size=16"]
    result = kd_here(
        "distill",
        f"method={method}",
        "student=resnet8",
        *synthetic,
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=3",
        *FAST,
        f"paths.outputs={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr[-3000:]
    done = summary(tmp_path / "run")
    assert done["status"] == "complete" and done["peers"]
    for peer in done["peers"].values():
        assert (tmp_path / "run" / peer["path"] / "model.safetensors").is_file()
        assert json.loads((tmp_path / "run" / peer["path"] / "model.json").read_text())["arch"] == "resnet8"
