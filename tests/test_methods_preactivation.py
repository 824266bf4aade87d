"""Pre-activation taps and the two methods that read them: OFD and AB.

The taps are checked on several model families (what they read is the stage's own pre-ReLU tensor, in place
or not, with its gradient, and gives the stage's output back). Each pure loss is checked against a float64
reference written here from the papers and the reference code's conventions (explicit loops in numpy or
math, never calling the implementation; OFD's margin from math.erf), its gradient by gradcheck, and its
edge cases. Then both methods run through the real CLI on digits and on CIFAR-shaped synthetic data, their
terms logged, AB's two phases visible in metrics.csv, and one run is resumed longer.
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
import torch.nn.functional as F
import yaml
from kdrun import FAST, SHORT, SYNTHETIC, assert_one_line_error, kd_here, summary
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import build_method
from kd_cli.methods.ab import ab_loss, boundary_loss
from kd_cli.methods.ofd import ofd_loss, ofd_margin, partial_l2
from kd_cli.models.blocks import GlobalAvgPool
from kd_cli.models.features import FeatureTap, PreActivationTap, preactivation_sites, set_feature_layers
from kd_cli.models.registry import create_model

CONFIGS = Path(__file__).parents[1] / "configs" / "method"


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rng(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def method_config(name: str, **overrides) -> dict:
    return {**yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), **overrides}


def _gradcheck(loss, *inputs: torch.Tensor) -> None:
    inputs = tuple(x.clone().requires_grad_(True) for x in inputs)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- pre-activation taps

# model -> {stage: (the ReLU read, the BatchNorm before it, read after the stage)}
SITES = {
    # one block a stage: layer2's projection shortcut BN runs after bn2, the residual branch's BN is taken
    "resnet8": {"layer1": ("layer1.0.relu", "layer1.0.bn2", False), "layer2": ("layer2.0.relu", "layer2.0.bn2", False)},
    "resnet20": {"layer3": ("layer3.2.relu", "layer3.2.bn2", False)},
    # pre-activation blocks: the next block's first BN of the stage output, then the closing BN-ReLU
    "wrn_16_1": {
        "block1": ("block2.0.relu1", "block2.0.bn1", True),
        "block2": ("block3.0.relu1", "block3.0.bn1", True),
        "head_act": ("head_act.1", "head_act.0", False),
    },
    "cnn": {"stages.0": ("stages.0.1.2", "stages.0.1.1", False), "stages.1": ("stages.1.2.2", "stages.1.2.1", False)},
    "vgg8": {"block4": ("block4.2", "block4.1", False)},
    # torchvision: in-place ReLUs, the downsample BN after bn2
    "resnet18": {
        "layer2": ("layer2.1.relu", "layer2.1.bn2", False),
        "layer4": ("layer4.1.relu", "layer4.1.bn2", False),
    },
}


def model_of(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(arch, 10, 1, 8, width=4) if arch == "cnn" else create_model(arch, 10)


@pytest.mark.parametrize("arch", sorted(SITES))
def test_the_tap_reads_each_stages_pre_activation_in_training_with_its_gradient(arch):
    model = model_of(arch)
    layers = list(model.kd_feature_layers)
    channels, size, _ = model.kd_input_shape
    sites = {site.layer: site for site in preactivation_sites(model, layers, channels, size)}
    for layer, (relu, norm, after) in SITES[arch].items():
        assert (sites[layer].relu, sites[layer].norm, sites[layer].after_stage) == (relu, norm, after), layer
    inplace = {name: m.inplace for name, m in model.named_modules() if isinstance(m, nn.ReLU)}
    model.train()
    images = torch.randn(4, channels, size, size)
    torch.manual_seed(1)
    plain = model(images)
    with FeatureTap(model, layers) as stages, PreActivationTap(model, sites.values()) as tap:
        assert all(not model.get_submodule(site.relu).inplace for site in sites.values())
        torch.manual_seed(1)
        logits = model(images)
    assert torch.equal(logits, plain)  # the tap changes nothing the model computes
    assert inplace == {name: m.inplace for name, m in model.named_modules() if isinstance(m, nn.ReLU)}
    for layer, site in sites.items():
        pre, out = tap.outputs[layer], stages.outputs[layer]
        assert pre.requires_grad and (pre < 0).any(), layer  # before the ReLU, in the autograd graph
        if site.after_stage:  # the next block's BN (training mode: batch statistics) of the stage's output
            norm = model.get_submodule(site.norm)
            expected = F.batch_norm(out, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
            torch.testing.assert_close(pre, expected)
        else:
            assert torch.equal(pre.clamp_min(0), out), layer
    tap.outputs[layers[0]].sum().backward()
    assert next(model.parameters()).grad is not None


def test_the_tap_reads_the_residual_sum_itself_not_a_copy_of_the_output():
    """resnet8's single block of layer2, recomputed by hand: bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)."""
    model = model_of("resnet8").eval()
    sites = preactivation_sites(model, ["layer2"], 3, 32)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), FeatureTap(model, ["layer1"]) as inputs, PreActivationTap(model, sites, detach=True) as tap:
        model(images)
        block, x = model.layer2[0], inputs.outputs["layer1"]
        expected = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))) + block.shortcut(x)
    torch.testing.assert_close(tap.outputs["layer2"], expected)
    assert not tap.outputs["layer2"].requires_grad and not model.layer2[0]._forward_hooks  # detached; hooks removed


def test_an_in_place_relu_would_have_overwritten_the_pre_activation():
    """Why the tap switches in-place ReLUs off: with torchvision's inplace=True kept, the input a hook holds
    is the ReLU's output by the time the stage returns."""
    model = model_of("resnet18").train()
    relu = model.layer4[1].relu
    held = {}
    handle = relu.register_forward_hook(lambda m, args, out: held.__setitem__("input", args[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    handle.remove()
    assert relu.inplace and not (held["input"] < 0).any()  # overwritten by relu(input)


def test_a_stage_that_does_not_end_in_a_relu_is_refused_in_one_line():
    model = create_model("mobilenetv2", 10)  # linear bottlenecks: the stages end in BatchNorm
    with pytest.raises(KdError) as error:
        preactivation_sites(model, model.kd_feature_layers, 3, 32, who="method=ab (teacher)")
    message = str(error.value)
    assert "\n" not in message and message.startswith("method=ab (teacher) needs layers that end in an nn.ReLU")
    assert "'blocks.1' of MobileNetV2" in message and "cifar resnets, cnn, wrn, vgg" in message


class ChangesItsInput(nn.Module):
    """Ends in a ReLU, then scales the ReLU's input in place: what was read is no longer the pre-activation."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        x = self.bn(self.conv(x))
        out = self.relu(x)
        x.mul_(2)
        return out


def test_a_pre_activation_changed_in_place_afterwards_is_refused():
    model = nn.Sequential(ChangesItsInput(), GlobalAvgPool(), nn.Linear(4, 10))
    with pytest.raises(KdError, match=r"^method=ofd \(student\) needs layers that end in an nn.ReLU.*'0'.*; fix$"):
        preactivation_sites(model, ["0"], 1, 8, who="method=ofd (student)", fix="fix")


# ---------------------------------------------------------------- float64 references


def ref_margin(gamma: float, beta: float) -> float:
    """E[x | x < 0] for x ~ N(beta, gamma^2): beta - s phi(beta/s) / Phi(-beta/s), -3s when Phi(-beta/s) <= 0.001."""
    s = abs(gamma)
    below = 0.5 * (1 + math.erf(-beta / s / math.sqrt(2)))
    if below > 0.001:
        return beta - s * math.exp(-((beta / s) ** 2) / 2) / math.sqrt(2 * math.pi) / below
    return -3 * s


def ref_partial_l2(fs: np.ndarray, ft: np.ndarray, margin: np.ndarray) -> float:
    batch, channels, height, width = fs.shape
    total = 0.0
    for b in range(batch):
        for c in range(channels):
            for h in range(height):
                for w in range(width):
                    s, target = fs[b, c, h, w], max(ft[b, c, h, w], margin[c])
                    if s > target or target > 0:
                        total += (s - target) ** 2
    return total / batch


def ref_boundary(fs: np.ndarray, ft: np.ndarray, m: float) -> float:
    total = 0.0
    for s, t in zip(fs.ravel(), ft.ravel()):
        if t <= 0 and s > -m:
            total += (s + m) ** 2
        if t > 0 and s <= m:
            total += (s - m) ** 2
    return total / len(fs)


def test_ofd_margin_is_the_mean_of_the_negative_responses_with_the_references_fallback():
    gamma = [1.0, -0.5, 2.0, 0.3, 1.0, 1.0, 0.7]
    beta = [0.0, 0.4, -1.5, 0.9, 3.0, 3.5, -4.0]  # 3.0: P(x<0)=0.00135 (formula); 3.5: 0.00023 (-3 sigma)
    margin = ofd_margin(torch.tensor(gamma), torch.tensor(beta), len(gamma)).numpy()
    np.testing.assert_allclose(margin, [ref_margin(g, b) for g, b in zip(gamma, beta)], rtol=1e-6)
    assert margin[5] == pytest.approx(-3.0) and margin[0] == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)
    # the closed form is the conditional mean: numerical integration of x N(x; beta, gamma^2) over x < 0
    x = np.linspace(-12.0, 0.0, 200_001)
    density = np.exp(-(((x - beta[1]) / 0.5) ** 2) / 2)
    assert margin[1] == pytest.approx(np.trapezoid(x * density, x) / np.trapezoid(density, x), rel=1e-6)


def test_ofd_margin_edge_cases():
    # weight 0: the constant beta (its own negative mean when negative, no negative response otherwise)
    margin = ofd_margin(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([-0.7, 0.5, 0.0]), 3)
    assert margin.tolist() == [pytest.approx(-0.7), 0.0, 0.0]
    # no affine parameters: N(0, 1)
    assert ofd_margin(None, None, 2).tolist() == pytest.approx([-math.sqrt(2 / math.pi)] * 2)
    assert torch.isfinite(ofd_margin(torch.tensor([1e-30]), torch.tensor([5.0]), 1)).all()


def test_partial_l2_and_ofd_loss_match_the_reference():
    fs, ft = rng(2, 3, 4, 4, seed=1), rng(2, 3, 4, 4, seed=2) * 1.5
    margin = np.array([-0.8, -0.3, -1.2])
    value = partial_l2(torch.from_numpy(fs), torch.from_numpy(ft), torch.from_numpy(margin)).item()
    assert value == pytest.approx(ref_partial_l2(fs, ft, margin), rel=1e-12)
    students = [rng(2, 3, 4, 4, seed=k) for k in (3, 4, 5)]
    teachers = [rng(2, 3, 4, 4, seed=k) for k in (6, 7, 8)]
    expected = sum(w * ref_partial_l2(s, t, margin) for w, s, t in zip([0.25, 0.5, 1.0], students, teachers))
    value = ofd_loss(
        [torch.from_numpy(s) for s in students], [torch.from_numpy(t) for t in teachers], [torch.from_numpy(margin)] * 3
    ).item()
    assert value == pytest.approx(expected, rel=1e-12)
    _gradcheck(lambda s: partial_l2(s, torch.from_numpy(ft), torch.from_numpy(margin)), torch.from_numpy(fs))


def test_partial_l2_skips_only_a_student_below_a_non_positive_target():
    margin = torch.tensor([-1.0], dtype=torch.float64)
    teacher = torch.tensor([-3.0, -0.5, 2.0], dtype=torch.float64).view(1, 1, 1, 3)  # targets -1, -0.5, 2
    below = torch.tensor([-5.0, -0.7, 1.0], dtype=torch.float64).view(1, 1, 1, 3)
    assert partial_l2(below, teacher, margin).item() == pytest.approx(1.0)  # only the positive target counts
    above = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64).view(1, 1, 1, 3)
    assert partial_l2(above, teacher, margin).item() == pytest.approx(1.0 + 1.0)
    target = torch.maximum(teacher, margin.view(1, -1, 1, 1))
    assert partial_l2(target, teacher, margin).item() == 0


def test_ab_loss_matches_the_reference_and_its_edges():
    fs, ft = rng(2, 3, 4, 4, seed=9) * 1.5, rng(2, 3, 4, 4, seed=10)
    for m in (1.0, 0.5):
        value = boundary_loss(torch.from_numpy(fs), torch.from_numpy(ft), m).item()
        assert value == pytest.approx(ref_boundary(fs, ft, m), rel=1e-12)
    students, teachers = [rng(2, 2, 2, 2, seed=k) for k in (11, 12)], [rng(2, 2, 2, 2, seed=k) for k in (13, 14)]
    expected = 0.5 * ref_boundary(students[0], teachers[0], 1.0) + ref_boundary(students[1], teachers[1], 1.0)
    value = ab_loss([torch.from_numpy(s) for s in students], [torch.from_numpy(t) for t in teachers], 1.0).item()
    assert value == pytest.approx(expected, rel=1e-12)
    _gradcheck(lambda s: boundary_loss(s, torch.from_numpy(ft), 1.0), torch.from_numpy(fs))
    # beyond the margin on the teacher's side of the boundary: nothing to learn; the margin itself is the edge
    teacher = torch.tensor([-1.0, 0.0, 2.0, 0.1], dtype=torch.float64).view(1, 1, 2, 2)
    student = torch.tensor([-1.5, -1.0, 1.2, 1.0], dtype=torch.float64).view(1, 1, 2, 2)
    assert boundary_loss(student, teacher, 1.0).item() == 0
    assert boundary_loss(-student, teacher, 1.0).item() == pytest.approx(2.5**2 + 2**2 + 2.2**2 + 2**2)


# ---------------------------------------------------------------- the methods on real models


@pytest.fixture(scope="module")
def cifar_models():
    """resnet8 (16/32/64 channels) as the student of resnet32x4 (64/128/256)."""
    torch.manual_seed(0)
    return create_model("resnet8", 10), create_model("resnet32x4", 10)


def test_ofd_takes_each_margin_from_the_teacher_bn_before_its_relu_and_trains_student_and_connectors(cifar_models):
    student, teacher = cifar_models
    with torch.no_grad():
        for module in teacher.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.2, 1.5), module.bias.uniform_(-1, 1)
    method = build_method(method_config("ofd"), student, teacher)
    for margin, norm in zip(method.margins, (teacher.layer1[-1].bn2, teacher.layer2[-1].bn2, teacher.layer3[-1].bn2)):
        torch.testing.assert_close(margin, ofd_margin(norm.weight, norm.bias, norm.num_features).float())
    conv, bn = method.connectors[2]
    assert (conv.in_channels, conv.out_channels, conv.bias, bn.num_features) == (64, 256, None, 256)
    images, labels = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    logits, terms = method(images, labels)
    assert logits.shape == (3, 10) and set(terms) == {"ce", "ofd"} and terms["ofd"] > 0
    method.zero_grad()
    sum(terms.values()).backward()
    assert student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.connectors.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(k.startswith("connectors") for k in student.state_dict())
    assert method.teacher_cache_outputs() is None  # pre-activations are never served from the cache


def test_ofd_on_a_wide_resnet_teacher_reads_the_next_blocks_bn():
    torch.manual_seed(0)
    student, teacher = create_model("wrn_16_1", 10), create_model("wrn_16_2", 10)
    with torch.no_grad():
        for module in teacher.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.uniform_(-1, 1)
    method = build_method(method_config("ofd"), student, teacher)
    for margin, norm in zip(method.margins, (teacher.block2[0].bn1, teacher.block3[0].bn1, teacher.head_act[0])):
        torch.testing.assert_close(margin, ofd_margin(norm.weight, norm.bias, norm.num_features).float())
    _, terms = method(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert torch.isfinite(terms["ofd"])


class NoNorm(nn.Module):
    """Two conv-ReLU stages without BatchNorm."""

    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()),
        )
        self.pool, self.fc = GlobalAvgPool(), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.pool(self.stages(x)))


def no_norm() -> nn.Module:
    model = set_feature_layers(NoNorm(), ["stages.0", "stages.1"], "pool")
    model.kd_input_shape = (1, 8, 8)
    return model


def test_ofd_refuses_a_teacher_without_bn_before_its_relu_and_ab_does_not_need_one():
    student = create_model("cnn", 10, 1, 8, width=4)
    with pytest.raises(
        KdError,
        match=r"^method=ofd takes its margins from the BatchNorm.*'stages.0.1' in teacher "
        r"layer 'stages.0'.*teacher_layers\)$",
    ):
        build_method(method_config("ofd"), student, no_norm())
    build_method(method_config("ab"), student, no_norm())
    with pytest.raises(KdError, match=r"^method=ofd \(teacher\) needs layers that end in an nn.ReLU.*'blocks.1'"):
        build_method(
            method_config("ofd", teacher_layers=["blocks.1", "blocks.2", "blocks.4"]),
            create_model("resnet8", 10),
            create_model("mobilenetv2", 10),
        )
    with pytest.raises(KdError, match="needs feature maps"):
        build_method(
            method_config("ab", teacher_layers=["stages.1"]),
            create_model("mlp", 10, 1, 8),
            create_model("cnn", 10, 1, 8),
        )


def test_ab_trains_body_and_connectors_on_the_boundaries_first_then_classifies_without_the_teacher(cifar_models):
    student, teacher = cifar_models
    method = build_method(method_config("ab", init_epochs=2), student, teacher)
    assert method.phased and all(isinstance(c, nn.Sequential) for c in method.connectors)
    calls = []
    handle = teacher.register_forward_hook(lambda *args: calls.append(1))
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    method.zero_grad()
    method.start_epoch(1, 10)
    _, terms = method(images, labels)
    assert set(terms) == {"ab_init"} and calls and terms["ab_init"] > 0
    terms["ab_init"].backward()
    assert student.fc.weight.grad is None and student.layer3[0].conv2.weight.grad is not None
    assert all(p.grad is not None for p in method.connectors.parameters())
    calls.clear()
    method.start_epoch(2, 10)
    _, terms = method(images, labels)
    assert set(terms) == {"ce"} and not calls  # RepDistiller's main phase: CE alone, the teacher idle
    handle.remove()
    with pytest.raises(KdError, match="method.init_epochs=2 leaves none of trainer.epochs=2"):
        method.start_epoch(0, 2)


def test_ab_connectors_only_where_channels_differ_its_main_phase_term_and_no_phase_without_its_weight():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", 10), create_model("resnet20", 10)  # 16/32/64 both
    method = build_method(method_config("ab", ab_weight=0.5, init_epochs=1), student, teacher)
    assert all(isinstance(c, nn.Identity) for c in method.connectors)
    method.start_epoch(1, 3)
    _, terms = method(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert set(terms) == {"ce", "ab"} and terms["ab"] > 0
    no_phase = build_method(method_config("ab", ab_init_weight=0.0, ab_weight=1.0), student, teacher)
    assert no_phase.init_epochs == 0 and not no_phase.phased
    assert build_method(method_config("ab", ab_init_weight=0.0), student, teacher).connectors is None


# ---------------------------------------------------------------- the real CLI

STUDENTS = {"digits": ["student=cnn", "student.kwargs.width=8"], "cifar": [*SYNTHETIC, "student=resnet8"]}
PHASES = ["method.init_epochs=1", "trainer.epochs=2"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, short_teachers) -> Path:
    out = tmp_path_factory.mktemp("ofd_ab_cli")
    common = [*SHORT, f"paths.outputs={out}"]
    for data in ("digits", "cifar"):
        for method, extra in {"ofd": [], "ab": PHASES}.items():
            result = kd_here(
                "distill",
                f"method={method}",
                *common,
                *extra,
                *STUDENTS[data],
                f"teacher.checkpoint={short_teachers[data]}",
                f"hydra.run.dir={out / f'{data}-{method}'}",
                cwd=out,
            )
            assert result.code == 0, result.stderr[-3000:]
    return out


def rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("data", ["digits", "cifar"])
def test_cli_ofd_logs_its_terms(cli_runs, data):
    run = cli_runs / f"{data}-ofd"
    done = summary(run)
    assert done["status"] == "complete" and done["method"] == "ofd" and done["role"] == "student"
    (row,) = rows(run)
    assert all(math.isfinite(float(row[f"train_{t}"])) and float(row[f"train_{t}"]) > 0 for t in ("ce", "ofd"))
    assert (run / "model.safetensors").is_file()


@pytest.mark.parametrize("data", ["digits", "cifar"])
def test_cli_ab_logs_its_two_phases(cli_runs, data):
    run = cli_runs / f"{data}-ab"
    assert summary(run)["status"] == "complete" and summary(run)["epochs"] == 2
    first, second = rows(run)
    assert float(first["train_ab_init"]) > 0 and first["train_ce"] == ""  # phase 1: the boundaries alone
    assert second["train_ab_init"] == "" and float(second["train_ce"]) > 0  # phase 2: CE alone
    assert "train_ab" not in first


def test_an_ofd_run_resumes_longer_with_its_connectors_and_margins(cli_runs, tmp_path):
    run = tmp_path / "ofd"
    shutil.copytree(cli_runs / "cifar-ofd", run)
    (run / "summary.json").write_text(json.dumps({**summary(run), "status": "interrupted"}))
    result = kd_here("distill", f"resume={run}", "trainer.epochs=2", "resume_extend=true", cwd=cli_runs)
    assert result.code == 0, result.stderr[-3000:]
    done = summary(run)
    assert done["status"] == "complete" and done["epochs"] == 2
    assert done["resumes"][-1]["changes"] == ["trainer.epochs=2"]
    assert [row["epoch"] for row in rows(run)] == ["1", "2"] and float(rows(run)[1]["train_ofd"]) > 0


def test_cli_refuses_a_student_whose_stages_do_not_end_in_a_relu_in_one_line(cli_runs, short_teachers):
    result = kd_here(
        "distill",
        "method=ofd",
        *SHORT,
        *SYNTHETIC,
        "student=shufflenetv2",
        f"paths.outputs={cli_runs}",
        f"teacher.checkpoint={short_teachers['cifar']}",
        f"hydra.run.dir={cli_runs / 'refused'}",
        cwd=cli_runs,
    )
    assert_one_line_error(
        result,
        "method=ofd (student) needs layers that end in an nn.ReLU module",
        "'layer1' of ShuffleNetV2",
        "method.student_layers",
    )
    assert not (cli_runs / "refused" / "metrics.csv").exists()


def test_an_initialisation_phase_that_fills_the_epochs_is_refused_before_anything_is_written(tmp_path):
    """AB's 30 initialisation epochs against trainer.epochs=1: refused by the dry build, before a teacher is
    trained or the run directory is written (the rule lives in Distiller.start_epoch, run there once)."""
    result = kd_here(
        "distill", "method=ab", "student=cnn", "trainer.epochs=1", *FAST, f"paths.outputs={tmp_path}", cwd=tmp_path
    )
    assert_one_line_error(result, "method.init_epochs=30 leaves none of trainer.epochs=1", "lower method.init_epochs")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a refused run wrote files"


@pytest.mark.parametrize("name", ["ofd", "ab"])
def test_default_stages_that_do_not_pair_up_say_to_pick_another_student(name):
    student, teacher = create_model("mlp", 10, 1, 8), create_model("cnn", 10, 1, 8)
    with pytest.raises(
        KdError,
        match=rf"^method={name} pairs the models' stages, but the student MLP has 1 and "
        r"the teacher .* 2; pick a student with as many stages \(e.g. student=cnn",
    ):
        build_method(method_config(name), student, teacher)
