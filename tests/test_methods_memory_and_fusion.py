"""CRD and ReviewKD: the loss functions against float64 references written here from the papers'
equations, gradients, memory banks and resume state, layer pairing, and one CLI run per method
on digits and on CIFAR-shaped synthetic data."""

from __future__ import annotations

import csv
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from kdrun import SHORT, SYNTHETIC, Result, kd_here_each, summary

from kd_cli.errors import KdError
from kd_cli.methods import build_method
from kd_cli.methods.crd import contrast_scores, draw_negatives, momentum_update, nce_loss
from kd_cli.methods.reviewkd import hcl_loss
from kd_cli.models import create_model

CRD = dict(
    name="crd",
    student_layers=None,
    teacher_layers=None,
    feat_dim=16,
    nce_k=16384,
    nce_t=0.07,
    nce_momentum=0.5,
    crd_weight=0.8,
    ce_weight=1.0,
    kd_weight=0.0,
    temperature=4.0,
)
REVIEWKD = dict(
    name="reviewkd",
    student_layers=None,
    teacher_layers=None,
    reviewkd_weight=5.0,
    warmup=20,
    max_mid_channels=512,
    ce_weight=1.0,
    kd_weight=0.0,
    temperature=4.0,
)


# ---------------------------------------------------------------- references (float64, from the equations)


def reference_nce(scores: torch.Tensor, num_samples: int) -> float:
    """Tian et al. eq. 18: -1/B sum_b [log h+/(h+ + K/N) + sum_k log (K/N)/(h-_k + K/N)]."""
    batch, columns = scores.shape
    noise = (columns - 1) / num_samples
    total = 0.0
    for b in range(batch):
        positive = scores[b, 0].item()
        total += math.log(positive / (positive + noise))
        total += sum(math.log(noise / (scores[b, k].item() + noise)) for k in range(1, columns))
    return -total / batch


def block_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average pooling to size x size for maps whose sides are multiples of size."""
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(dim=(3, 5))


def reference_hcl(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> float:
    """Per level: (mse + sum_i 2^-i mse(pool_i)) / (1 + sum_i 2^-i) over the pool sizes 4, 2, 1 below h."""
    total = 0.0
    for s, t in zip(students, teachers):
        terms = [(1.0, ((s - t) ** 2).mean().item())]
        sizes = [size for size in (4, 2, 1) if size < s.shape[2]]
        for i, size in enumerate(sizes, start=1):
            terms.append((0.5**i, ((block_mean(s, size) - block_mean(t, size)) ** 2).mean().item()))
        total += sum(w * v for w, v in terms) / sum(w for w, _ in terms)
    return total


# ---------------------------------------------------------------- CRD: pure functions


def test_nce_loss_matches_the_paper_equation():
    generator = torch.Generator().manual_seed(0)
    for batch, negatives in [(3, 5), (1, 4)]:
        scores = torch.rand(batch, 1 + negatives, generator=generator, dtype=torch.float64) * 2 + 0.01
        assert nce_loss(scores, 20).item() == pytest.approx(reference_nce(scores, 20), rel=1e-6)


def test_contrast_scores_are_exp_of_scaled_dot_products():
    generator = torch.Generator().manual_seed(1)
    memory = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    anchor = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    rows = torch.tensor([[3, 0, 6], [1, 1, 2]])
    scores = contrast_scores(anchor, memory, rows, 0.5)
    for b in range(2):
        for k in range(3):
            expected = math.exp(sum(memory[rows[b, k], d].item() * anchor[b, d].item() for d in range(4)) / 0.5)
            assert scores[b, k].item() == pytest.approx(expected, rel=1e-12)


def test_nce_gradient_given_fixed_memory():
    generator = torch.Generator().manual_seed(2)
    memory = F.normalize(torch.randn(10, 5, generator=generator, dtype=torch.float64), dim=1)
    rows = torch.randint(0, 10, (3, 4), generator=generator)
    anchor = torch.randn(3, 5, generator=generator, dtype=torch.float64, requires_grad=True)

    def loss(a):
        return nce_loss(contrast_scores(F.normalize(a, dim=1), memory, rows, 0.5) / 3.0, 10)

    assert torch.autograd.gradcheck(loss, (anchor,))


def test_memory_update_is_momentum_then_renormalise():
    generator = torch.Generator().manual_seed(3)
    memory = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    before = memory.clone()
    embeddings = F.normalize(torch.randn(2, 3, generator=generator, dtype=torch.float64), dim=1)
    momentum_update(memory, torch.tensor([4, 1]), embeddings, 0.5)
    for row, embedding in zip([4, 1], embeddings):
        mixed = [0.5 * before[row, d].item() + 0.5 * embedding[d].item() for d in range(3)]
        norm = math.sqrt(sum(v * v for v in mixed))
        assert memory[row].tolist() == pytest.approx([v / norm for v in mixed], rel=1e-12)
    untouched = [0, 2, 3, 5]
    assert torch.equal(memory[untouched], before[untouched])


def test_negatives_are_uniform_over_the_other_samples():
    torch.manual_seed(0)
    index = torch.tensor([0, 3, 4])
    drawn = draw_negatives(index, 4000, 5)
    assert drawn.min() >= 0 and drawn.max() <= 4
    assert not (drawn == index[:, None]).any()
    counts = torch.bincount(drawn[1], minlength=5).double() / 4000  # anchor 3: the other four at 1/4 each
    assert counts[3] == 0 and torch.allclose(counts[[0, 1, 2, 4]], torch.full((4,), 0.25).double(), atol=0.03)


# ---------------------------------------------------------------- CRD: the method


def crd_method(num_samples: int = 50, **options):
    torch.manual_seed(0)
    student, teacher = create_model("mlp", 10, 1, 8), create_model("cnn", 10, 1, 8, width=4)
    return build_method({**CRD, **options}, student, teacher, num_samples=num_samples)


def test_nce_k_is_clamped_to_the_other_samples_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="kd"):
        assert crd_method(num_samples=50).nce_k == 49
    assert len([r for r in caplog.records if "nce_k" in r.message]) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kd"):
        assert crd_method(num_samples=50, nce_k=8).nce_k == 8
    assert not caplog.records


def test_crd_banks_belong_to_the_method_not_the_student():
    method = crd_method()
    keys = method.state_dict().keys()
    assert {"memory_student", "memory_teacher", "normaliser"} <= keys
    assert {"embed_student.linear.weight", "embed_teacher.linear.weight"} <= keys
    assert not any("memory" in k or "embed" in k for k in method.student.state_dict())
    assert method.memory_student.shape == (50, 16)
    bound = 1 / math.sqrt(16 / 3)  # RepDistiller's uniform initialisation
    assert method.memory_teacher.abs().max() <= bound


def test_crd_step_updates_the_banks_and_fixes_z_on_the_first_batch():
    method = crd_method()
    images, labels, index = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([7, 0, 49, 20])
    before = method.memory_student.clone()
    with torch.no_grad():  # the MLP student has no dropout or BN: its embedding is the one forward sees
        expected = method.embed_student(method.student_features(images)[1][0])
    _, terms = method(images, labels, index)
    assert set(terms) == {"ce", "crd"} and terms["crd"].item() > 0
    terms["crd"].backward()
    assert method.embed_student.linear.weight.grad.abs().sum() > 0
    assert method.embed_teacher.linear.weight.grad.abs().sum() > 0  # the teacher's head learns too
    assert torch.allclose(method.memory_student[index], F.normalize(0.5 * before[index] + 0.5 * expected, dim=1))
    others = torch.ones(50, dtype=torch.bool)
    others[index] = False
    assert torch.equal(method.memory_student[others], before[others])
    z = method.normaliser.clone()
    assert (z > 0).all()
    method(images, labels, torch.tensor([1, 2, 3, 4]))
    assert torch.equal(method.normaliser, z)


def test_crd_works_on_a_batch_of_one():
    _, terms = crd_method()(torch.randn(1, 1, 8, 8), torch.tensor([3]), torch.tensor([5]))
    assert torch.isfinite(terms["crd"])


def test_crd_state_dict_resumes_the_same_trajectory():
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    first = crd_method()
    first(images, labels, torch.tensor([0, 1, 2, 3]))
    resumed = crd_method()
    resumed.load_state_dict(first.state_dict())
    torch.manual_seed(9)
    expected = first(images, labels, torch.tensor([4, 5, 6, 7]))[1]["crd"]
    torch.manual_seed(9)
    assert resumed(images, labels, torch.tensor([4, 5, 6, 7]))[1]["crd"].item() == pytest.approx(expected.item())
    assert torch.equal(resumed.memory_teacher, first.memory_teacher)


def test_crd_options_are_checked():
    with pytest.raises(KdError, match="nce_t"):
        crd_method(nce_t=0.0)
    with pytest.raises(KdError, match="one layer of each model"):
        crd_method(student_layers=["hidden.0", "fc"], teacher_layers=["stages.0", "pool"])


# ---------------------------------------------------------------- ReviewKD: HCL


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 4, 4), (1, 2, 2, 2), (1, 5, 1, 1)])
def test_hcl_matches_the_reference(shape):
    generator = torch.Generator().manual_seed(4)
    students = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2)]
    teachers = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2)]
    assert hcl_loss(students, teachers).item() == pytest.approx(reference_hcl(students, teachers), rel=1e-10)


def test_hcl_is_zero_for_identical_features_and_has_exact_gradients():
    generator = torch.Generator().manual_seed(5)
    features = [
        torch.randn(1, 2, 8, 8, generator=generator, dtype=torch.float64),
        torch.randn(2, 3, 1, 1, generator=generator, dtype=torch.float64),
    ]
    assert hcl_loss(features, [f.clone() for f in features]).item() == 0
    student = [f.clone().requires_grad_() for f in features]
    teacher = [torch.randn_like(f) for f in features]
    assert torch.autograd.gradcheck(lambda a, b: hcl_loss([a, b], teacher), tuple(student))


# ---------------------------------------------------------------- ReviewKD: the method


def reviewkd_method(student: str, teacher: str, size: int, channels: int, student_kwargs=None, **options):
    torch.manual_seed(0)
    s = create_model(student, 10, channels, size, **(student_kwargs or {}))
    t = create_model(teacher, 10, channels, size)
    return build_method({**REVIEWKD, **options}, s, t)


def test_reviewkd_maps_unequal_channels_and_sizes_onto_the_teacher():
    # cnn (2 stages, 8x8 and 4x4) vs resnet20 (3 stages at 8x8, 4x4, 2x2): the deepest two of each
    method = reviewkd_method("cnn", "resnet20", 8, 3, {"width": 4})
    assert method.student_layers == ["stages.0", "stages.1", "pool"]
    assert method.teacher_layers == ["layer2", "layer3", "pool"]
    assert [abf.attention is None for abf in method.abfs] == [False, False, True]  # the deepest fuses nothing
    images = torch.randn(3, 3, 8, 8)
    _, student_features = method.student_features(images)
    _, teacher_features = method.teacher_features(images)
    fused = method.review(student_features)
    assert [f.shape[1:] for f in fused] == [(32, 4, 4), (64, 2, 2), (64, 1, 1)]
    assert [f.shape[1:] for f in teacher_features] == [(32, 4, 4), (64, 2, 2), (64,)]
    _, terms = method(images, torch.tensor([0, 1, 2]))
    assert set(terms) == {"ce", "reviewkd"}
    terms["reviewkd"].backward()
    assert all(p.grad is not None for p in method.abfs.parameters())
    assert method.student.stages[0][0][0].weight.grad.abs().sum() > 0


def test_reviewkd_warmup_is_linear_over_epochs():
    method = reviewkd_method("resnet8", "resnet20", 8, 3)
    factors = []
    for epoch in (0, 9, 19, 30):
        method.start_epoch(epoch, 40)
        factors.append(method.warmup_factor())
    assert factors == [1 / 20, 10 / 20, 1.0, 1.0]
    assert reviewkd_method("resnet8", "resnet20", 8, 3, warmup=0).warmup_factor() == 1.0


def test_reviewkd_rejects_students_without_feature_maps():
    with pytest.raises(KdError, match="feature maps"):
        reviewkd_method("mlp", "cnn", 8, 1)
    with pytest.raises(KdError, match="batches of at least 2"):
        reviewkd_method("cnn", "cnn", 8, 1)(torch.randn(1, 1, 8, 8), torch.tensor([0]))


# ---------------------------------------------------------------- the CLI, end to end
# The four students, from the session's two short teachers, run by the CLI in this process.

STUDENTS = {
    "crd-digits": ("digits", ["method=crd"]),
    "reviewkd-digits": ("digits", ["method=reviewkd", "student=cnn", "student.kwargs.width=8"]),
    "crd-synthetic": ("cifar", ["method=crd", *SYNTHETIC, "teacher=resnet20", "student=resnet8"]),
    "reviewkd-synthetic": ("cifar", ["method=reviewkd", *SYNTHETIC, "teacher=resnet20", "student=resnet8"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, short_teachers):
    """name -> (run directory, Result) of each student run."""
    outputs = tmp_path_factory.mktemp("crd_reviewkd")
    common = [*SHORT, f"paths.outputs={outputs}"]
    students = kd_here_each(
        {
            name: [
                "distill",
                *args,
                f"teacher.checkpoint={short_teachers[teacher]}",
                *common,
                f"hydra.run.dir={outputs / name}",
            ]
            for name, (teacher, args) in STUDENTS.items()
        },
        outputs,
    )
    return {name: (outputs / name, result) for name, result in students.items()}


def assert_complete(runs, name: str, method: str, terms: set[str]) -> Result:
    run, result = runs[name]
    assert result.code == 0, f"{name} failed ({result.code}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    done = summary(run)
    assert done["status"] == "complete" and done["method"] == method
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and {f"train_{t}" for t in terms} <= rows[0].keys()
    assert all(math.isfinite(float(rows[0][f"train_{t}"])) for t in terms)
    return result


def test_crd_cli_on_digits(runs):
    result = assert_complete(runs, "crd-digits", "crd", {"ce", "crd"})
    assert "using 1256 negatives" in result.stdout + result.stderr  # digits: 1,257 training images
    state = torch.load(runs["crd-digits"][0] / "checkpoints/last.pt", weights_only=True)["method"]
    assert state["memory_student"].shape == (1257, 128) and (state["normaliser"] > 0).all()


def test_reviewkd_cli_on_digits(runs):
    assert_complete(runs, "reviewkd-digits", "reviewkd", {"ce", "reviewkd"})


@pytest.mark.parametrize("method, terms", [("crd", {"ce", "crd"}), ("reviewkd", {"ce", "reviewkd"})])
def test_cifar_shaped_resnet20_to_resnet8(runs, method, terms):
    assert_complete(runs, f"{method}-synthetic", method, terms)
