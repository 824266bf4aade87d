"""PAD-L2 (prime-aware adaptive distillation) and KDSVD (self-supervised KD through SVD).

Each pure loss is checked against a float64 reference written here from the papers and the conventions
the YAMLs name (explicit loops in numpy, numpy.linalg.svd per sample; never calling the implementation),
its gradient by `torch.autograd.gradcheck` (the SVD's guarded backward also against torch's own where
that one is defined), and its edge cases (zero maps, dead channels, repeated singular values, a batch of
one). Then both methods run through the real CLI on digits and on CIFAR-shaped synthetic data, their
terms logged, and one run is resumed longer.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from kdrun import SHORT, SYNTHETIC, kd_here, summary

from kd_cli.errors import KdError
from kd_cli.methods import build_method
from kd_cli.methods.kdsvd import kdsvd_loss, top_right_singular_vectors
from kd_cli.methods.pad import VARIANCE_EPS, Unchanged, pad_loss
from kd_cli.models.features import FeatureTap
from kd_cli.models.registry import create_model

CONFIGS = Path(__file__).parents[1] / "configs" / "method"
TERMS = {"pad": "pad", "kdsvd": "kdsvd"}


def rng(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def method_config(name: str, **overrides) -> dict:
    return {**yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), **overrides}


def _gradcheck(loss, *inputs: torch.Tensor) -> None:
    inputs = tuple(x.clone().requires_grad_(True) for x in inputs)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- float64 references (numpy, loops)


def ref_pad(student: np.ndarray, teacher: np.ndarray, log_variance: np.ndarray) -> float:
    """The authors' code's PAD-L2: mean over samples of the mean over elements of
    (t - s)^2 / (exp(a) + 1e-6) + a."""
    per_sample = []
    for s, t, a in zip(student, teacher, log_variance):
        s, t, a = s.ravel(), t.ravel(), a.ravel()
        per_sample.append(sum((t[d] - s[d]) ** 2 / (math.exp(a[d]) + 1e-6) + a[d] for d in range(len(s))) / len(s))
    return sum(per_sample) / len(per_sample)


def ref_kdsvd(student: list[np.ndarray], teacher: list[np.ndarray], k: int) -> float:
    """KD-Zoo's KDSVD: per sample SVD of the (H*W, C) matrix; teacher's top k right singular vectors (sign:
    largest-magnitude entry positive) and top k singular values scaled to unit norm; for each teacher vector,
    the student's vector of largest |cosine| among its top k+3, sign flipped to agree; both scaled by the
    teacher's values; RBF exp(-d^2/8) between every entry pair of consecutive layers; squared difference
    summed, over the batch averaged."""
    batch, total, previous = len(student[0]), 0.0, None
    for fs, ft in zip(student, teacher):
        current = []
        for b in range(batch):
            xs, xt = fs[b].reshape(fs.shape[1], -1).T, ft[b].reshape(ft.shape[1], -1).T
            _, values, vt = np.linalg.svd(xt, full_matrices=False)
            _, _, vs = np.linalg.svd(xs, full_matrices=False)
            norm = math.sqrt(sum(values[j] ** 2 for j in range(k)))
            a_s, a_t = np.zeros((xs.shape[1], k)), np.zeros((xt.shape[1], k))
            for j in range(k):
                v = vt[j] if vt[j][np.argmax(np.abs(vt[j]))] > 0 else -vt[j]
                candidates = vs[: min(k + 3, len(vs))]
                cosines = [c @ v for c in candidates]
                best = int(np.argmax(np.abs(cosines)))
                a_t[:, j] = v * values[j] / norm
                a_s[:, j] = (1.0 if cosines[best] >= 0 else -1.0) * candidates[best] * values[j] / norm
            current.append((a_s, a_t))
        if previous is not None:
            for b in range(batch):
                (s_now, t_now), (s_before, t_before) = current[b], previous[b]
                for m in range(len(s_now)):
                    for n in range(len(s_before)):
                        for j in range(k):
                            g_s = math.exp(-((s_now[m, j] - s_before[n, j]) ** 2) / 8)
                            g_t = math.exp(-((t_now[m, j] - t_before[n, j]) ** 2) / 8)
                            total += (g_s - g_t) ** 2
        previous = current
    return total / batch


# ---------------------------------------------------------------- PAD-L2: values, gradients, edge cases


@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 3, 3)])
def test_pad_matches_the_authors_form_on_vectors_and_maps(shape):
    s, t, a = rng(*shape, seed=1), rng(*shape, seed=2), 0.5 * rng(*shape, seed=3)
    value = pad_loss(torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(a)).item()
    assert value == pytest.approx(ref_pad(s, t, a), rel=1e-10)
    _gradcheck(lambda s_, a_: pad_loss(s_, torch.from_numpy(t), a_), torch.from_numpy(s), torch.from_numpy(a))


def test_pad_is_the_mse_at_unit_variance_and_least_where_the_variance_matches_the_error():
    s, t = torch.from_numpy(rng(5, 4, seed=4)), torch.from_numpy(rng(5, 4, seed=5))
    mse = ((s - t) ** 2).mean().item()
    assert pad_loss(s, t, torch.zeros_like(s)).item() == pytest.approx(mse / (1 + VARIANCE_EPS), rel=1e-12)
    # per element, d^2 / sigma^2 + log sigma^2 is least at sigma^2 = d^2 (the variance the student should predict)
    best = torch.log((s - t) ** 2)
    assert all(pad_loss(s, t, best).item() < pad_loss(s, t, best + shift).item() for shift in (-1.0, -0.1, 0.1, 1.0))
    assert pad_loss(s, s, torch.full_like(s, -3.0)).item() == pytest.approx(
        -3.0
    )  # negative: a matched, confident student


# ---------------------------------------------------------------- KDSVD: values, gradients, edge cases


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_matches_the_reference_on_tall_and_wide_maps_of_unequal_grids(k):
    """Layer 1: H*W > C (16 x 3 student, 64 x 3 teacher); layer 2: H*W < C (4 x 5, the null-space case);
    layer 3: square."""
    student = [rng(3, 3, 4, 4, seed=10), rng(3, 5, 2, 2, seed=11), rng(3, 4, 2, 2, seed=12)]
    teacher = [rng(3, 3, 8, 8, seed=13), rng(3, 5, 2, 2, seed=14), rng(3, 4, 2, 2, seed=15)]
    value = kdsvd_loss([torch.from_numpy(x) for x in student], [torch.from_numpy(x) for x in teacher], k).item()
    assert value == pytest.approx(ref_kdsvd(student, teacher, k), rel=1e-10)
    assert value > 0


def test_kdsvd_gradient_is_finite_differences_on_both_sides_of_the_null_space():
    student = [torch.from_numpy(rng(2, 3, 4, 4, seed=20)), torch.from_numpy(rng(2, 5, 2, 2, seed=21))]
    teacher = [torch.from_numpy(rng(2, 3, 4, 4, seed=22)), torch.from_numpy(rng(2, 5, 2, 2, seed=23))]
    _gradcheck(lambda s0, s1: kdsvd_loss([s0, s1], teacher, 2), *student)


@pytest.mark.parametrize("m, n, count", [(16, 5, 4), (4, 7, 3), (6, 6, 6)])
def test_the_guarded_svd_gradient_is_torchs_exact_one_where_that_is_defined(m, n, count):
    """A sign-invariant function of the top right singular vectors: the same gradient as through
    torch.linalg.svd's own backward (distinct singular values), and finite differences agree."""
    torch.manual_seed(0)
    x = torch.randn(2, m, n, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, n, count, dtype=torch.float64)

    def f(vectors):
        return ((vectors * weights) ** 2).sum()

    (ours,) = torch.autograd.grad(f(top_right_singular_vectors(x, count)), x)
    (theirs,) = torch.autograd.grad(f(torch.linalg.svd(x, full_matrices=False)[2][:, :count].transpose(1, 2)), x)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    _gradcheck(lambda x_: f(top_right_singular_vectors(x_, count)), x.detach())


def _student_gradient(student_map: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)
    first = student_map.clone().requires_grad_(True)
    channels = student_map.shape[1]
    loss = kdsvd_loss(
        [first, torch.randn(2, channels, 2, 2)], [torch.randn(2, channels, 4, 4), torch.randn(2, channels, 2, 2)], 1
    )
    loss.backward()
    assert torch.isfinite(loss)
    return first.grad


def test_degenerate_maps_give_finite_gradients():
    """Zero map (every singular value 0), dead channels (repeated zero singular values, where torch's own SVD
    backward gives NaN), and exactly repeated non-zero singular values (orthogonal channels of equal norm)."""
    zero = _student_gradient(torch.zeros(2, 6, 4, 4))
    assert torch.equal(zero, torch.zeros_like(zero))
    dead = torch.randn(2, 6, 4, 4)
    dead[:, 3:] = 0
    assert torch.isfinite(_student_gradient(dead)).all()
    x = dead.flatten(2).transpose(1, 2).double().requires_grad_(True)
    vh = torch.linalg.svd(x, full_matrices=False)[2]
    (builtin,) = torch.autograd.grad((vh[:, :4] ** 2 * torch.randn(4, 6, dtype=torch.float64)).sum(), x)
    assert not torch.isfinite(builtin).all()  # why the guard exists
    orthogonal = torch.linalg.qr(torch.randn(2, 16, 6))[0] * 3.0  # (B, H*W, C): 6 equal singular values
    equal = _student_gradient(orthogonal.transpose(1, 2).reshape(2, 6, 4, 4))
    assert torch.isfinite(equal).all()


def test_kdsvd_is_zero_for_the_teachers_maps_and_blind_to_what_svd_ignores():
    maps = [torch.from_numpy(rng(2, 4, 4, 4, seed=30)), torch.from_numpy(rng(2, 6, 2, 2, seed=31))]
    assert kdsvd_loss(maps, maps, 2).item() == 0
    other = [torch.from_numpy(rng(2, 4, 4, 4, seed=32)), torch.from_numpy(rng(2, 6, 2, 2, seed=33))]
    base = kdsvd_loss(other, maps, 1).item()
    # right singular vectors depend only on X^T X: a positive scale and an order of the positions leave them
    scaled = [other[0] * 3.5, other[1]]
    assert kdsvd_loss(scaled, maps, 1).item() == pytest.approx(base, rel=1e-10)
    positions = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = [other[0].flatten(2)[:, :, positions].reshape(2, 4, 4, 4), other[1]]
    assert kdsvd_loss(shuffled, maps, 1).item() == pytest.approx(base, rel=1e-10)
    # the student's sign is aligned away, the teacher's fixed: negating either map changes nothing
    assert kdsvd_loss([-other[0], other[1]], [-maps[0], maps[1]], 1).item() == pytest.approx(base, rel=1e-10)


# ---------------------------------------------------------------- the methods on real models


def cnns(student_width: int, teacher_width: int = 8):
    torch.manual_seed(0)
    return create_model("cnn", 10, 1, 8, width=student_width), create_model("cnn", 10, 1, 8, width=teacher_width)


def _tapped(model: torch.nn.Module, layers: list[str], images: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad(), FeatureTap(model, layers) as tap:
        model(images)
    return [tap.outputs[name] for name in layers]


@pytest.mark.parametrize(
    "student_width, regressor, regressed", [(4, "auto", True), (8, "auto", False), (8, "always", True)]
)
def test_pad_distills_the_embeddings_through_a_regressor_only_where_the_shapes_differ(
    student_width, regressor, regressed
):
    student, teacher = cnns(student_width)
    method = build_method(method_config("pad", regressor=regressor), student, teacher)
    assert method.student_layers == method.teacher_layers == ["pool"]  # the authors' code: the pooled embedding
    assert isinstance(method.regressors[0], Unchanged) != regressed
    estimator = method.variance_estimators[0].net
    assert (estimator[0].in_features, estimator[0].out_features, estimator[1].num_features) == (
        2 * student_width,
        16,
        16,
    )
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    _, terms = method(images, labels)
    assert set(terms) == {"ce", "pad"} and all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    if not regressed:  # the pure loss on the raw embeddings, both over the teacher's scale, and the log-variances
        s, t = _tapped(student, ["pool"], images)[0], _tapped(teacher, ["pool"], images)[0]
        method.train()
        scale = t.pow(2).mean(1, keepdim=True).sqrt()
        torch.testing.assert_close(terms["pad"], pad_loss(s / scale, t / scale, method.variance_estimators[0](s)))
    method.zero_grad()
    sum(terms.values()).backward()
    adapters = [n for n, p in method.named_parameters() if not n.startswith("student.")]
    assert adapters and all(p.grad is not None for n, p in method.named_parameters() if n in adapters)
    assert student.fc.weight.grad.abs().sum() > 0 and student.stages[0][0][0].weight.grad.abs().sum() > 0
    assert any(k.startswith("variance_estimators.") for k in method.extra_state())  # saved for resume
    assert not any(k.startswith(("regressors", "variance")) for k in student.state_dict())


def test_pad_on_maps_predicts_a_variance_per_channel_and_position():
    student, teacher = create_model("resnet8", 10), create_model("resnet32x4", 10)
    method = build_method(method_config("pad", student_layers=["layer2"], teacher_layers=["layer2"]), student, teacher)
    s = torch.randn(2, 32, 16, 16)
    assert method.variance_estimators[0](s).shape == (2, 128, 16, 16)
    _, terms = method(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert torch.isfinite(terms["pad"])


def test_pad_refuses_what_it_cannot_compare():
    student, teacher = cnns(4)
    with pytest.raises(KdError, match=r"^method pad cannot pair student layer 'stages.1' .* with teacher layer 'pool'"):
        build_method(method_config("pad", student_layers=["stages.1"], teacher_layers=["pool"]), student, teacher)
    method = build_method(method_config("pad"), student, teacher)
    with pytest.raises(
        KdError, match=r"^method=pad predicts its variances through BatchNorm .* raise trainer.batch_size$"
    ):
        method(torch.randn(1, 1, 8, 8), torch.tensor([3]))
    method.eval()
    method(torch.randn(1, 1, 8, 8), torch.tensor([3]))  # evaluation reads BatchNorm's running statistics


def test_kdsvd_connects_unequal_widths_and_leaves_equal_ones_alone():
    student, teacher = cnns(4)
    method = build_method(method_config("kdsvd"), student, teacher)
    assert method.student_layers == ["stages.0", "stages.1"]  # every stage output, as mdistiller's feats[1:]
    conv, norm = method.connectors[0]
    assert (conv.in_channels, conv.out_channels, conv.bias, norm.num_features) == (4, 8, None, 8)
    images, labels = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    _, terms = method(images, labels)
    assert set(terms) == {"ce", "kdsvd"} and torch.isfinite(terms["kdsvd"]) and terms["kdsvd"] > 0
    method.zero_grad()
    sum(terms.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters() if p.requires_grad)
    assert method.connectors[0][0].weight.grad.abs().sum() > 0
    equal = build_method(method_config("kdsvd"), *cnns(8))
    assert not [n for n, _ in equal.named_parameters() if not n.startswith("student.")]  # nothing to learn beside


def test_kdsvd_term_is_the_pure_loss_on_the_connected_maps():
    student, teacher = create_model("resnet8", 10), create_model("resnet20", 10)
    method = build_method(method_config("kdsvd", kdsvd_weight=2.0), student, teacher)
    images = torch.randn(2, 3, 32, 32)
    _, terms = method(images, torch.tensor([0, 1]))
    layers = ["layer1", "layer2", "layer3"]
    expected = kdsvd_loss(_tapped(student, layers, images), _tapped(teacher, layers, images), 1)
    torch.testing.assert_close(terms["kdsvd"], 2.0 * expected)


def test_kdsvd_refuses_what_it_cannot_compare_in_one_line():
    student, teacher = cnns(4)
    cases = [
        (
            {"student_layers": ["stages.1"], "teacher_layers": ["stages.1"]},
            r"^method=kdsvd relates consecutive layers and needs at least 2 maps of each model, got 1",
        ),
        (
            {"student_layers": ["stages.1", "pool"], "teacher_layers": ["stages.1", "pool"]},
            r"^method kdsvd needs feature maps \(C,H,W\) but student layer 'pool'",
        ),
        (
            {"k": 9},
            (
                r"^method.k=9 asks for more singular vectors than teacher layer 'stages.0' has "
                r"\(min\(H\*W, C\) = 8\); lower method.k"
            ),
        ),
    ]
    for options, message in cases:
        with pytest.raises(KdError, match=message) as error:
            build_method(method_config("kdsvd", **options), student, teacher)
        assert "\n" not in str(error.value)
    build_method(method_config("kdsvd", k=8), student, teacher)  # the largest that every map has


# ---------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, short_teachers) -> Path:
    out = tmp_path_factory.mktemp("pad_kdsvd_cli")
    common = [*SHORT, f"paths.outputs={out}"]
    sweep = ["distill", "-m", "method=pad,kdsvd", *common, "hydra.sweep.subdir=${method.name}"]
    jobs = {  # digits: cnn width 8 under the width-32 teacher (regressor, connectors); cifar: resnet8 under resnet20
        "digits": [*sweep, f"teacher.checkpoint={short_teachers['digits']}", "student=cnn", "student.kwargs.width=8"],
        "cifar": [*sweep, f"teacher.checkpoint={short_teachers['cifar']}", "student=resnet8", *SYNTHETIC],
    }
    for data, args in jobs.items():
        result = kd_here(*args, f"hydra.sweep.dir={out / f'{data}-sweep'}", cwd=out)
        assert result.code == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("data", ["digits", "cifar"])
@pytest.mark.parametrize("method", ["pad", "kdsvd"])
def test_cli_distill_logs_every_term(cli_runs, data, method):
    run = cli_runs / f"{data}-sweep/{method}"
    done = summary(run)
    assert done["status"] == "complete" and done["method"] == method and done["role"] == "student"
    with open(run / "metrics.csv") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["train_ce"]) > 0 and math.isfinite(float(row["train_ce"]))
    term = float(row[f"train_{TERMS[method]}"])  # PAD's can be negative (small predicted variances)
    assert math.isfinite(term) and term != 0 and (term > 0 or method == "pad")
    assert (run / "model.safetensors").is_file()


def test_a_pad_run_resumes_longer_with_its_variance_branch(cli_runs, tmp_path):
    """A run stopped after its first epoch continues from its checkpoint, which holds the regressor and the
    variance branch (weights and BatchNorm statistics: a mismatch would be refused)."""
    run = tmp_path / "pad"
    shutil.copytree(cli_runs / "digits-sweep" / "pad", run)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["method"]
    assert any(k.startswith("variance_estimators.0.net.1.running_var") for k in state)
    assert any(k.startswith("regressors.0.") for k in state)
    (run / "summary.json").write_text(json.dumps({**summary(run), "status": "interrupted"}))
    result = kd_here("distill", f"resume={run}", "trainer.epochs=2", "resume_extend=true", cwd=cli_runs)
    assert result.code == 0, result.stderr[-3000:]
    done = summary(run)
    assert (
        done["status"] == "complete" and done["epochs"] == 2 and done["resumes"][-1]["changes"] == ["trainer.epochs=2"]
    )
    with open(run / "metrics.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
