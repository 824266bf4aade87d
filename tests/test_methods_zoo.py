"""The methods added to the classic tables' zoo: NST, ICKD and Tf-KD.

Each pure loss is checked against a float64 reference written here from the paper's equations and
the conventions the YAML names (explicit loops over samples and channel pairs in numpy, never calling
the implementation), its gradient by `torch.autograd.gradcheck`, and its edge cases. Then each method
runs through the real CLI on digits and on CIFAR-shaped synthetic data, its terms logged, and one
run is resumed longer.
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
from kdrun import SHORT, SYNTHETIC, kd_here_ok, summary

from kd_cli.errors import KdError
from kd_cli.methods import METHODS, build_method
from kd_cli.methods.ctkd import learned_temperature, reversal_strength
from kd_cli.methods.fsp import fsp_loss, fsp_matrix
from kd_cli.methods.ft import factor, ft_loss
from kd_cli.methods.ickd import channel_correlation, ickd_loss
from kd_cli.methods.logit_utils import kd_loss
from kd_cli.methods.nst import nst_loss
from kd_cli.methods.srd import srd_feature_loss, srd_logit_loss
from kd_cli.methods.tfkd import tfkd_loss, virtual_teacher
from kd_cli.models.registry import create_model

CONFIGS = Path(__file__).parents[1] / "configs" / "method"
FEATURE_METHODS = ["nst", "ickd", "srd"]
SWEPT = [*FEATURE_METHODS, "ctkd"]  # the methods with a teacher, one sweep per data set in the CLI tests
PHASED = ["fsp", "ft"]  # an initialisation phase first: run with init_epochs=1 of 2 epochs
TERMS = {"nst": ["nst"], "ickd": ["ickd"], "tfkd": ["tfkd"], "srd": ["srd_feature", "srd_logits"], "ctkd": ["kd"]}


def rng(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def block_mean(x: np.ndarray, h: int, w: int) -> np.ndarray:
    b, c, height, width = x.shape
    return x.reshape(b, c, h, height // h, w, width // w).mean(axis=(3, 5))


# ---------------------------------------------------------------- float64 references (numpy, loops)


def ref_nst(fs: np.ndarray, ft: np.ndarray) -> float:
    """Huang & Wang's MMD^2 with k(x, y) = (x . y)^2 over each sample's L2-normalised channels."""
    h, w = min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3])
    fs, ft = block_mean(fs, h, w), block_mean(ft, h, w)

    def channels(x):
        flat = x.reshape(len(x), -1)
        return [row / np.linalg.norm(row) for row in flat]

    def mean_kernel(a, b):
        return sum((x @ y) ** 2 for x in a for y in b) / (len(a) * len(b))

    total = 0.0
    for i in range(len(fs)):
        s, t = channels(fs[i]), channels(ft[i])
        total += mean_kernel(t, t) + mean_kernel(s, s) - 2 * mean_kernel(s, t)
    return total / len(fs)


def ref_ickd(fs: np.ndarray, ft: np.ndarray) -> float:
    """sum_i ||norm_rows(F_s F_s^T) - norm_rows(F_t F_t^T)||_F^2 / (C * B), F the (C, H*W) map of sample i."""
    batch, channels = ft.shape[:2]

    def correlation(x):
        flat = x.reshape(channels, -1)
        gram = np.array([[flat[a] @ flat[b] for b in range(channels)] for a in range(channels)])
        return np.array([row / np.linalg.norm(row) for row in gram])

    return sum(((correlation(fs[i]) - correlation(ft[i])) ** 2).sum() for i in range(batch)) / (channels * batch)


def ref_tfkd(logits: np.ndarray, labels: np.ndarray, correct: float, temperature: float) -> float:
    batch, classes = logits.shape
    total = 0.0
    for i in range(batch):
        teacher = np.full(classes, (1 - correct) / (classes - 1))
        teacher[labels[i]] = correct
        q = np.exp(teacher / temperature) / np.exp(teacher / temperature).sum()
        log_p = logits[i] - math.log(np.exp(logits[i]).sum())
        total += sum(q[k] * (math.log(q[k]) - log_p[k]) for k in range(classes))
    return total / (batch * classes)


# ---------------------------------------------------------------- values, gradients, edge cases


@pytest.mark.parametrize(
    "s_shape, t_shape", [((3, 4, 8, 8), (3, 6, 4, 4)), ((2, 5, 4, 4), (2, 3, 8, 8)), ((2, 3, 4, 4), (2, 3, 4, 4))]
)
def test_nst_matches_the_mmd_reference_with_unequal_channels_and_grids(s_shape, t_shape):
    fs, ft = rng(*s_shape, seed=1), rng(*t_shape, seed=2)
    value = nst_loss(torch.from_numpy(fs), torch.from_numpy(ft)).item()
    assert value == pytest.approx(ref_nst(fs, ft), rel=1e-10)


def test_ickd_matches_the_reference_and_ignores_the_grid_size():
    fs, ft = rng(3, 4, 4, 4, seed=3), rng(3, 4, 2, 2, seed=4)
    value = ickd_loss(torch.from_numpy(fs), torch.from_numpy(ft)).item()
    assert value == pytest.approx(ref_ickd(fs, ft), rel=1e-10)


@pytest.mark.parametrize("correct, temperature", [(0.99, 20.0), (0.9, 1.0), (0.5, 4.0)])
def test_tfkd_matches_the_authors_reduction(correct, temperature):
    logits, labels = rng(5, 7, seed=5), np.array([0, 3, 6, 2, 3])
    value = tfkd_loss(torch.from_numpy(logits), torch.from_numpy(labels), correct, temperature).item()
    assert value == pytest.approx(ref_tfkd(logits, labels, correct, temperature), rel=1e-10)


def test_srd_matches_the_authors_feature_and_logit_terms():
    fs, ft = rng(3, 4, 4, 4, seed=16), rng(3, 4, 2, 2, seed=17)
    means_s, means_t = fs.reshape(3, 4, -1).mean(2), ft.reshape(3, 4, -1).mean(2)
    expected = sum((means_s[i, c] - means_t[i, c]) ** 2 for i in range(3) for c in range(4)) / 12
    assert srd_feature_loss(torch.from_numpy(fs), torch.from_numpy(ft)).item() == pytest.approx(expected, rel=1e-10)
    zs, zt = rng(3, 5, seed=18), rng(3, 5, seed=19)
    assert srd_logit_loss(torch.from_numpy(zs), torch.from_numpy(zt)).item() == pytest.approx(((zs - zt) ** 2).mean())
    _gradcheck(lambda s: srd_feature_loss(s, torch.from_numpy(ft)), torch.from_numpy(fs))


def test_srd_runs_the_teachers_own_head_on_the_students_features(cifar_models):
    """The teacher with its last stage's output replaced: on the teacher's own map it gives the teacher's
    logits; on another map, pool + the teacher's classifier of it (resnet32x4's head); gradient reaches it."""
    student, teacher = cifar_models
    method = build_method(method_config("srd"), student, teacher).eval()
    images = torch.randn(2, 3, 32, 32)
    from kd_cli.models.features import FeatureTap

    with torch.no_grad(), FeatureTap(teacher, ["layer3"]) as tap:
        own_logits = teacher(images)
    torch.testing.assert_close(method.teacher_head(images, tap.outputs["layer3"]), own_logits)
    other = torch.rand(2, 256, 8, 8, requires_grad=True)
    head = method.teacher_head(images, other)
    torch.testing.assert_close(head, teacher.fc(other.mean((2, 3))))
    head.sum().backward()
    assert other.grad is not None and all(p.grad is None for p in teacher.parameters())
    assert not teacher._forward_hooks and not teacher.layer3._forward_hooks  # the replacement is removed


@pytest.mark.parametrize("epoch, strength", [(0, (1 - math.cos(math.pi / 10)) / 2), (4, 0.5), (9, 1.0), (50, 1.0)])
def test_ctkd_reversal_follows_the_cosine_curriculum_of_the_authors(epoch, strength):
    assert reversal_strength(epoch, 10, 1.0) == pytest.approx(strength)
    assert reversal_strength(epoch, 10, 0.5) == pytest.approx(strength / 2)


def test_ctkd_learns_its_temperature_against_the_students_loss():
    """Forward: KD at T = t_min + t_range * sigmoid(theta). Backward: the student's gradient is KD's at that T,
    theta's is -lambda times the loss's own gradient with respect to theta (gradient ascent on T)."""
    torch.manual_seed(0)
    student, teacher = create_model("mlp", 10, 1, 8), create_model("mlp", 10, 1, 8)
    method = build_method(method_config("ctkd"), student, teacher)
    method.start_epoch(4, 240)  # lambda = 0.5
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    _, terms = method(images, labels)
    theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        z_s, z_t = student(images).double(), teacher(images).double()
    reference = 0.9 * kd_loss(z_s, z_t, 1.0 + 20.0 * torch.sigmoid(theta))
    assert terms["kd"].item() == pytest.approx(reference.item(), rel=1e-5)
    terms["kd"].backward()
    reference.backward()
    assert method.theta.grad.item() == pytest.approx(-0.5 * theta.grad.item(), rel=5e-3)  # theta is float32
    plain = learned_temperature(torch.tensor(0.0), 1.0, 20.0, 0.5)
    assert plain.item() == pytest.approx(11.0)  # sigmoid(0) = 1/2


def test_fsp_matrices_match_the_papers_definition():
    """G_ij = mean over positions of bottom_i * top_j, the larger map pooled to the smaller grid."""
    bottom, top = rng(2, 3, 8, 8, seed=20), rng(2, 4, 4, 4, seed=21)
    pooled = block_mean(bottom, 4, 4)
    expected = np.array([[[(pooled[b, i] * top[b, j]).mean() for i in range(3)] for j in range(4)] for b in range(2)])
    np.testing.assert_allclose(
        fsp_matrix(torch.from_numpy(bottom), torch.from_numpy(top)).numpy(), expected, rtol=1e-12
    )
    student = [
        torch.from_numpy(rng(2, 3, 4, 4, seed=22)),
        torch.from_numpy(rng(2, 4, 2, 2, seed=23)),
        torch.from_numpy(rng(2, 5, 2, 2, seed=24)),
    ]
    teacher = [torch.from_numpy(rng(*t.shape, seed=30 + k)) for k, t in enumerate(student)]
    pairs = [(0, 1), (1, 2)]
    expected_loss = sum(
        ((fsp_matrix(student[a], student[b]) - fsp_matrix(teacher[a], teacher[b])) ** 2).mean().item() for a, b in pairs
    )
    assert fsp_loss(student, teacher).item() == pytest.approx(expected_loss, rel=1e-12)
    _gradcheck(lambda s0: fsp_loss([s0, *student[1:]], teacher), student[0])


def test_fsp_trains_its_matrices_first_then_classifies_without_running_the_teacher():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", 10), create_model("resnet20", 10)
    method = build_method(method_config("fsp", init_epochs=2), student, teacher)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    method.start_epoch(1, 10)
    _, terms = method(images, labels)
    assert set(terms) == {"fsp"} and calls
    terms["fsp"].backward()
    assert student.fc.weight.grad is None  # phase 1 moves the layers under the matrices only
    calls.clear()
    method.start_epoch(2, 10)
    _, terms = method(images, labels)
    assert set(terms) == {"ce"} and not calls  # phase 2: CE alone, the teacher idle
    with pytest.raises(KdError, match="method.init_epochs=2 leaves none of trainer.epochs=2"):
        method.start_epoch(0, 2)


def test_fsp_refuses_what_it_cannot_compare_and_skips_a_phase_without_a_term():
    with pytest.raises(KdError, match="compares channels one to one.*layer1 .16. / layer1 .64."):
        build_method(method_config("fsp"), create_model("resnet8", 10), create_model("resnet32x4", 10))
    no_phase = build_method(
        method_config("fsp", fsp_weight=0.0), create_model("resnet8", 10), create_model("resnet20", 10)
    )
    assert no_phase.init_epochs == 0  # its only term left out: no initialisation phase


def test_ft_factor_and_loss_match_repdistillers_factor_transfer():
    fs, ft = rng(2, 3, 4, 4, seed=40), rng(2, 5, 2, 2, seed=41)

    def ref_factor(x):
        flat = (x**2).mean(axis=1).reshape(len(x), -1)
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)

    np.testing.assert_allclose(factor(torch.from_numpy(ft)).numpy(), ref_factor(ft), rtol=1e-12)
    expected = np.abs(ref_factor(block_mean(fs, 2, 2)) - ref_factor(ft)).mean()
    assert ft_loss(torch.from_numpy(fs), torch.from_numpy(ft)).item() == pytest.approx(expected, rel=1e-12)
    _gradcheck(lambda s: ft_loss(s, torch.from_numpy(ft)), torch.from_numpy(fs))


def test_ft_trains_the_paraphraser_first_then_transfers_its_factor_through_the_translator(cifar_models):
    student, teacher = cifar_models
    method = build_method(method_config("ft", init_epochs=1), student, teacher)
    assert method.phased and method.paraphraser.encoder[2].out_channels == 128  # resnet32x4's 256 x rate 0.5
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    method.zero_grad()
    method.start_epoch(0, 5)
    _, terms = method(images, labels)
    assert set(terms) == {"paraphrase"}
    terms["paraphrase"].backward()
    assert all(p.grad is None for p in [*student.parameters(), *method.translator.parameters()])
    assert all(p.grad is not None for p in method.paraphraser.parameters())
    method.zero_grad()
    method.start_epoch(1, 5)
    _, terms = method(images, labels)
    assert set(terms) == {"ce", "ft"}
    sum(terms.values()).backward()
    assert all(p.grad is None for p in method.paraphraser.parameters())  # frozen after its phase
    assert all(p.grad is not None for p in method.translator.parameters()) and student.conv1.weight.grad is not None


def test_the_virtual_teacher_is_a_distribution_that_prefers_the_label():
    teacher = virtual_teacher(torch.tensor([2, 0]), 5, 0.9)
    assert torch.allclose(teacher.sum(1), torch.ones(2))
    assert teacher[0, 2] == pytest.approx(0.9) and teacher[0, 0] == pytest.approx(0.025)


def _gradcheck(loss, *inputs: torch.Tensor) -> None:
    inputs = tuple(x.clone().requires_grad_(True) for x in inputs)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)


def test_gradients_of_the_pure_losses():
    maps_s, maps_t = torch.from_numpy(rng(2, 3, 4, 4, seed=6)), torch.from_numpy(rng(2, 4, 2, 2, seed=7))
    _gradcheck(lambda s: nst_loss(s, maps_t), maps_s)
    same_channels = torch.from_numpy(rng(2, 3, 2, 2, seed=8))
    _gradcheck(lambda s: ickd_loss(s, same_channels), maps_s)
    labels = torch.tensor([1, 0, 3])
    _gradcheck(lambda z: tfkd_loss(z, labels, 0.99, 20.0), torch.from_numpy(rng(3, 4, seed=9)))


def test_equal_maps_give_zero_and_the_losses_ignore_what_the_papers_normalise_away():
    maps = torch.from_numpy(rng(3, 4, 4, 4, seed=10))
    assert abs(nst_loss(maps, maps).item()) < 1e-12
    assert ickd_loss(maps, maps).item() == 0
    # NST normalises each channel, ICKD each row of its correlation: a positive scale per channel / sample is invisible
    scale = torch.rand(1, 4, 1, 1, dtype=torch.float64) + 0.5
    other = torch.from_numpy(rng(3, 2, 8, 8, seed=11))
    assert nst_loss(maps * scale, other).item() == pytest.approx(nst_loss(maps, other).item(), rel=1e-10)
    per_sample = torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64).view(3, 1, 1, 1)
    assert torch.allclose(channel_correlation(maps * per_sample), channel_correlation(maps))


def test_tfkd_is_smallest_when_the_student_predicts_the_softened_virtual_teacher():
    labels = torch.tensor([1, 2])
    target = (virtual_teacher(labels, 4, 0.99, torch.float64) / 20).softmax(1)
    best = tfkd_loss(target.log(), labels, 0.99, 20.0).item()
    assert abs(best) < 1e-12
    assert tfkd_loss(target.log() + torch.randn(2, 4, dtype=torch.float64), labels, 0.99, 20.0).item() > best


# ---------------------------------------------------------------- the methods on real models


def method_config(name: str, **overrides) -> dict:
    return {**yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), **overrides}


@pytest.fixture(scope="module")
def cifar_models():
    """resnet8 (16/32/64 channels) as the student of resnet32x4 (64/128/256): unequal widths."""
    torch.manual_seed(0)
    return create_model("resnet8", 10), create_model("resnet32x4", 10)


@pytest.mark.parametrize(
    "name, layers", [("nst", ["layer1", "layer2", "layer3"]), ("ickd", ["layer3"]), ("srd", ["layer3"])]
)
def test_feature_method_on_unequal_widths_trains_the_student_and_its_adapters(name, layers, cifar_models):
    student, teacher = cifar_models
    method = build_method(method_config(name), student, teacher)
    assert method.student_layers == method.teacher_layers == layers
    images, labels = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    logits, terms = method(images, labels)
    assert logits.shape == (3, 10) and set(terms) == {"ce", *TERMS[name]}
    assert all(torch.isfinite(v) and v.dim() == 0 and v > 0 for v in terms.values())
    method.zero_grad()
    sum(terms.values()).backward()
    assert student.conv1.weight.grad.abs().sum() > 0
    adapters = [p for n, p in method.named_parameters() if not n.startswith("student.")]
    assert all(p.grad is not None for p in adapters)
    assert bool(adapters) == (name != "nst")  # NST compares the maps themselves
    assert not any(k.startswith(("embeds", "connector")) for k in student.state_dict())


def test_ickd_embeds_into_the_teachers_channels_without_bias(cifar_models):
    student, teacher = cifar_models
    method = build_method(method_config("ickd"), student, teacher)
    conv, norm = method.embeds[0]
    assert (conv.in_channels, conv.out_channels, conv.bias) == (64, 256, None) and norm.num_features == 256


def test_feature_methods_refuse_vectors_and_tfkd_a_virtual_teacher_that_does_not_prefer_the_label():
    mlp, cnn = create_model("mlp", 10, 1, 8), create_model("cnn", 10, 1, 8)
    for name in FEATURE_METHODS:
        with pytest.raises(KdError, match="needs feature maps.*student=cnn"):
            build_method(method_config(name, teacher_layers=["stages.1"]), mlp, cnn)
    with pytest.raises(KdError, match=r"method.correct_prob=0.1 must be above 1/10.*0.99"):
        build_method(method_config("tfkd", correct_prob=0.1), mlp, None)
    with pytest.raises(KdError, match=r"method.temperature=0 must be a number in \(0, 1000\]"):
        build_method(method_config("tfkd", temperature=0), mlp, None)


def test_tfkd_needs_no_teacher_and_trains_the_student():
    assert not METHODS.get("tfkd").requires_teacher
    student = create_model("mlp", 10, 1, 8)
    method = build_method(method_config("tfkd"), student, None)
    logits, terms = method(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert set(terms) == {"ce", "tfkd"}
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in student.parameters())


# ---------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, short_teachers) -> Path:
    out = tmp_path_factory.mktemp("zoo_cli")
    common = [*SHORT, f"paths.outputs={out}"]
    cifar = ["student=resnet8", *SYNTHETIC]
    # FSP and FT compare channels one to one: digits' cnn student at the cnn teacher's widths there.
    sweeps = {
        "sweep": (["-m", f"method={','.join(SWEPT)}"], {"digits": ["student=cnn", "student.kwargs.width=8"]}),
        "phased": (["-m", f"method={','.join(PHASED)}", "method.init_epochs=1"], {"digits": ["student=cnn"]}),
    }
    for name, (sweep, students) in sweeps.items():
        for data in ("digits", "cifar"):
            args = ["distill", *sweep, *common, "hydra.sweep.subdir=${method.name}", *students.get(data, cifar)]
            epochs = ["trainer.epochs=2"] if name == "phased" else []
            teacher = f"teacher.checkpoint={short_teachers[data]}"
            kd_here_ok(*args, *epochs, teacher, f"hydra.sweep.dir={out / f'{data}-{name}'}", cwd=out)
    for data, extra in {"digits": [], "cifar": [*SYNTHETIC, "student=resnet8"]}.items():
        kd_here_ok("distill", "method=tfkd", *common, *extra, f"hydra.run.dir={out / f'{data}-tfkd'}", cwd=out)
    return out


@pytest.mark.parametrize("data", ["digits", "cifar"])
@pytest.mark.parametrize("method", [*SWEPT, "tfkd"])
def test_cli_distill_logs_every_term(cli_runs, data, method):
    run = cli_runs / (f"{data}-tfkd" if method == "tfkd" else f"{data}-sweep/{method}")
    done = summary(run)
    assert done["status"] == "complete" and done["method"] == method and done["role"] == "student"
    with open(run / "metrics.csv") as handle:
        row = next(csv.DictReader(handle))
    for term in ("ce", *TERMS[method]):
        assert math.isfinite(float(row[f"train_{term}"])) and float(row[f"train_{term}"]) > 0, term
    assert (run / "model.safetensors").is_file()
    assert (done.get("teacher_arch") is None) == (method == "tfkd")  # Tf-KD trains no teacher and reads none


@pytest.mark.parametrize("data", ["digits", "cifar"])
@pytest.mark.parametrize(
    "method, first_terms, then_terms", [("fsp", ["fsp"], ["ce"]), ("ft", ["paraphrase"], ["ce", "ft"])]
)
def test_cli_phased_methods_log_their_two_phases(cli_runs, data, method, first_terms, then_terms):
    run = cli_runs / f"{data}-phased" / method
    assert summary(run)["status"] == "complete" and summary(run)["epochs"] == 2
    with open(run / "metrics.csv") as handle:
        first, second = csv.DictReader(handle)
    for term in {*first_terms, *then_terms}:
        assert (first[f"train_{term}"] != "") == (term in first_terms), term
        assert (second[f"train_{term}"] != "") == (term in then_terms), term
    assert all(float(first[f"train_{t}"]) > 0 for t in first_terms) and all(
        float(second[f"train_{t}"]) > 0 for t in then_terms
    )


def test_an_ickd_run_resumes_longer_with_its_embedding(cli_runs, tmp_path):
    """A run stopped after its first epoch continues from its checkpoint (the embedding's weights and
    BatchNorm statistics are in it: a mismatch would be refused)."""
    run = tmp_path / "ickd"
    shutil.copytree(cli_runs / "digits-sweep" / "ickd", run)
    (run / "summary.json").write_text(json.dumps({**summary(run), "status": "interrupted"}))
    kd_here_ok("distill", f"resume={run}", "trainer.epochs=2", "resume_extend=true", cwd=cli_runs)
    done = summary(run)
    assert (
        done["status"] == "complete" and done["epochs"] == 2 and done["resumes"][-1]["changes"] == ["trainer.epochs=2"]
    )
    with open(run / "metrics.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]


# ---------------------------------------------------------------- what the comparison with the references fixed


def test_cc_bilinear_kernel_is_the_dot_product_of_unit_embeddings():
    from kd_cli.methods.cc import cc_loss

    s, t = rng(4, 3, seed=12), rng(4, 5, seed=13)

    def gram(x):
        unit = [row / np.linalg.norm(row) for row in x]
        return np.array([[a @ b for b in unit] for a in unit])

    expected = ((gram(s) - gram(t)) ** 2).sum() / 16
    value = cc_loss(torch.from_numpy(s), torch.from_numpy(t), 0.4, 2, kernel="bilinear").item()
    assert value == pytest.approx(expected, rel=1e-10)


def test_cc_defaults_to_the_weight_of_the_formula_it_implements():
    """KD-Zoo's 100 for the Taylor-RBF form: the term is then of the order of the CE, not 1e-5 of it."""
    config = method_config("cc")
    assert config["cc_weight"] == 100.0 and config["kernel"] == "gaussian"
    student, teacher = create_model("cnn", 10, 1, 8, width=4), create_model("cnn", 10, 1, 8, width=8)
    torch.manual_seed(0)
    _, terms = build_method(config, student, teacher)(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    assert 1e-3 < terms["cc"].item() / terms["ce"].item()


def ref_at_paper(fs: np.ndarray, ft: np.ndarray) -> float:
    """The AT paper's eq. 2 with beta = 1 / (positions * batch): 1/2 sum_i ||a_s,i/|a_s,i| - a_t,i/|a_t,i|||_2."""
    batch, positions = len(fs), fs.shape[2] * fs.shape[3]
    total = 0.0
    for i in range(batch):
        a_s, a_t = (fs[i] ** 2).sum(axis=0).ravel(), (ft[i] ** 2).sum(axis=0).ravel()
        total += np.linalg.norm(a_s / np.linalg.norm(a_s) - a_t / np.linalg.norm(a_t))
    return total / 2 / (positions * batch)


def test_at_paper_form_matches_the_papers_equation_and_has_a_gradient():
    from kd_cli.methods.at import at_loss

    fs, ft = rng(3, 4, 4, 4, seed=14), rng(3, 6, 4, 4, seed=15)
    value = at_loss(torch.from_numpy(fs), torch.from_numpy(ft), 2.0, form="paper").item()
    assert value == pytest.approx(ref_at_paper(fs, ft), rel=1e-10)
    _gradcheck(lambda s: at_loss(s, torch.from_numpy(ft), 2.0, form="paper"), torch.from_numpy(fs))
    assert at_loss(torch.from_numpy(fs), torch.from_numpy(fs), 2.0, form="paper").item() == 0


@pytest.mark.parametrize("name, weight", [("at", "at_weight"), ("nst", "nst_weight")])
def test_tuned_input_size_carries_a_cifar_weight_to_other_input_sizes(name, weight):
    """AT's and NST's terms scale as 1 / (map positions): on 8x8 inputs the 32x32 weight is divided by 16,
    and the term is that weight times the same pure loss."""
    torch.manual_seed(0)
    student, teacher = create_model("cnn", 10, 1, 8, width=4), create_model("cnn", 10, 1, 8, width=8)
    images, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    published = build_method(method_config(name), student, teacher)
    carried = build_method(method_config(name, tuned_input_size=32), student, teacher)
    assert getattr(carried, weight) == getattr(published, weight) / 16
    term_published, term_carried = published(images, labels)[1][name], carried(images, labels)[1][name]
    assert term_carried.item() == pytest.approx(term_published.item() / 16, rel=1e-5)
    wide = create_model("resnet8", 10)  # 32x32 inputs: the tuned size itself, nothing changes
    assert getattr(
        build_method(method_config(name, tuned_input_size=32), wide, create_model("resnet20", 10)), weight
    ) == getattr(published, weight)
