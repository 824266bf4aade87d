"""Feature-distillation methods: fitnet, at, pkt, rkd, sp, vid, cc.

Each pure loss is checked against a float64 reference written here from the paper's equations
(explicit loops over samples, pairs and triplets in numpy, never calling the implementation),
its gradient by `torch.autograd.gradcheck`, and its edge cases (identical features, a batch of
one, unequal channels and grids). Then every method runs through the real CLI on digits and on
CIFAR-shaped synthetic data, the processes side by side (each is mostly single-threaded start-up).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from kdrun import SHORT, SYNTHETIC, kd_here, kd_here_each, summary

from kd_cli.errors import KdError
from kd_cli.methods import build_method
from kd_cli.methods.at import at_loss
from kd_cli.methods.cc import cc_loss
from kd_cli.methods.feature_utils import Regressor
from kd_cli.methods.fitnet import fitnet_loss
from kd_cli.methods.pkt import pkt_loss
from kd_cli.methods.rkd import rkd_angle_loss, rkd_distance_loss
from kd_cli.methods.sp import sp_loss
from kd_cli.methods.vid import vid_loss
from kd_cli.models.registry import create_model

METHODS = ["fitnet", "at", "pkt", "rkd", "sp", "vid", "cc"]
TERMS = {
    "fitnet": ["fitnet"],
    "at": ["at"],
    "pkt": ["pkt"],
    "rkd": ["rkd_distance", "rkd_angle"],
    "sp": ["sp"],
    "vid": ["vid"],
    "cc": ["cc"],
}
CONFIGS = Path(__file__).parents[1] / "configs" / "method"


def rng_tensor(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape))


# ---------------------------------------------------------------- float64 references (numpy, loops)


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def block_mean(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Average pooling to (h, w) for sizes that divide evenly (what adaptive pooling does then)."""
    b, c, H, W = x.shape
    return x.reshape(b, c, h, H // h, w, W // w).mean(axis=(3, 5))


def ref_at(fs: np.ndarray, ft: np.ndarray, p: float) -> float:
    h, w = min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3])
    fs, ft = block_mean(fs, h, w), block_mean(ft, h, w)
    total = 0.0
    for i in range(len(fs)):
        a_s = (np.abs(fs[i]) ** p).sum(axis=0).ravel()  # sum or mean over channels: equal once normalised
        a_t = (np.abs(ft[i]) ** p).sum(axis=0).ravel()
        total += ((a_s / np.linalg.norm(a_s) - a_t / np.linalg.norm(a_t)) ** 2).sum()
    return total / (len(fs) * h * w)


def ref_pkt(s: np.ndarray, t: np.ndarray) -> float:
    def conditional(x):
        b = len(x)
        k = np.array(
            [
                [(x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j])) + 1) / 2 for j in range(b)]
                for i in range(b)
            ]
        )
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = conditional(s), conditional(t)
    b = len(s)
    return sum(pt[i, j] * math.log(pt[i, j] / ps[i, j]) for i in range(b) for j in range(b)) / b**2


def ref_rkd_distance(s: np.ndarray, t: np.ndarray) -> float:
    b = len(s)

    def normalised(x):
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(b)] for i in range(b)])
        mu = sum(d[i, j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return d / mu

    ds, dt = normalised(s), normalised(t)
    return sum(huber(ds[i, j] - dt[i, j]) for i in range(b) for j in range(b)) / b**2


def ref_rkd_angle(s: np.ndarray, t: np.ndarray) -> float:
    b = len(s)

    def cos(x, i, j, k):
        if i == j or k == j:
            return 0.0  # no direction from a point to itself
        u, v = x[i] - x[j], x[k] - x[j]
        return u @ v / (np.linalg.norm(u) * np.linalg.norm(v))

    return sum(huber(cos(s, i, j, k) - cos(t, i, j, k)) for i in range(b) for j in range(b) for k in range(b)) / b**3


def ref_sp(s: np.ndarray, t: np.ndarray) -> float:
    b = len(s)

    def gram(x):
        q = x.reshape(b, -1)
        g = np.array([[q[i] @ q[j] for j in range(b)] for i in range(b)])
        return np.array([g[i] / np.linalg.norm(g[i]) for i in range(b)])

    return ((gram(t) - gram(s)) ** 2).sum() / b**2


def ref_vid(mean: np.ndarray, target: np.ndarray, variance: np.ndarray) -> float:
    total, count = 0.0, 0
    for index in np.ndindex(*target.shape):
        var = variance[index[1]]
        total += 0.5 * ((target[index] - mean[index]) ** 2 / var + math.log(var))
        count += 1
    return total / count


def ref_cc_kernel(a: np.ndarray, b: np.ndarray, gamma: float, order: int) -> float:
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * cos**p for p in range(order + 1))


def ref_cc(s: np.ndarray, t: np.ndarray, gamma: float, order: int) -> float:
    b = len(s)
    return (
        sum(
            (ref_cc_kernel(s[i], s[j], gamma, order) - ref_cc_kernel(t[i], t[j], gamma, order)) ** 2
            for i in range(b)
            for j in range(b)
        )
        / b**2
    )


def ref_fitnet(s: np.ndarray, t: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> float:
    """Pool to the smaller grid, 1x1 conv, BatchNorm with batch statistics (fresh affine), ReLU, MSE."""
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    s, t = block_mean(s, h, w), block_mean(t, h, w)
    y = np.einsum("oc,bchw->bohw", weight, s) + bias[None, :, None, None]
    mean, var = y.mean(axis=(0, 2, 3), keepdims=True), y.var(axis=(0, 2, 3), keepdims=True)
    y = np.maximum((y - mean) / np.sqrt(var + 1e-5), 0)
    return ((y - t) ** 2).mean()


# ---------------------------------------------------------------- values against the references


def test_at_matches_reference_with_unequal_channels_and_grids():
    for s_shape, t_shape in [((3, 2, 4, 4), (3, 5, 4, 4)), ((3, 2, 8, 8), (3, 6, 4, 4)), ((3, 6, 2, 2), (3, 3, 4, 4))]:
        fs, ft = rng_tensor(*s_shape, seed=1), rng_tensor(*t_shape, seed=2)
        assert at_loss(fs, ft, 2.0).item() == pytest.approx(ref_at(fs.numpy(), ft.numpy(), 2.0), rel=1e-10)
    assert at_loss(fs, ft, 3.0).item() == pytest.approx(ref_at(fs.numpy(), ft.numpy(), 3.0), rel=1e-10)


def test_relation_losses_match_references_with_unequal_dimensions():
    s, t = rng_tensor(5, 4, seed=3), rng_tensor(5, 7, seed=4)
    assert pkt_loss(s, t).item() == pytest.approx(ref_pkt(s.numpy(), t.numpy()), rel=1e-5)
    assert rkd_distance_loss(s, t).item() == pytest.approx(ref_rkd_distance(s.numpy(), t.numpy()), rel=1e-10)
    assert rkd_angle_loss(s, t).item() == pytest.approx(ref_rkd_angle(s.numpy(), t.numpy()), rel=1e-10)
    assert cc_loss(s, t, 0.4, 2).item() == pytest.approx(ref_cc(s.numpy(), t.numpy(), 0.4, 2), rel=1e-10)
    ms, mt = rng_tensor(5, 2, 4, 4, seed=5), rng_tensor(5, 3, 2, 2, seed=6)
    assert sp_loss(ms, mt).item() == pytest.approx(ref_sp(ms.numpy(), mt.numpy()), rel=1e-10)


def test_rkd_distance_is_large_enough_to_reach_the_linear_part_of_the_huber_loss():
    # one far-away sample makes some normalised distances differ by more than 1 (the |x| - 0.5 branch)
    s, t = rng_tensor(4, 3, seed=7), rng_tensor(4, 3, seed=8)
    s[0] *= 50
    assert rkd_distance_loss(s, t).item() == pytest.approx(ref_rkd_distance(s.numpy(), t.numpy()), rel=1e-10)


def test_cc_taylor_expansion_approaches_the_gaussian_rbf_kernel():
    a, b = rng_tensor(2, 6, seed=9).numpy()
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    exact = math.exp(-0.4 * np.linalg.norm(a - b) ** 2)
    assert ref_cc_kernel(a, b, 0.4, 12) == pytest.approx(exact, rel=1e-9)


def test_vid_matches_reference():
    mean, target = rng_tensor(3, 4, 2, 2, seed=10), rng_tensor(3, 4, 2, 2, seed=11)
    variance = torch.tensor([0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    assert vid_loss(mean, target, variance).item() == pytest.approx(
        ref_vid(mean.numpy(), target.numpy(), variance.numpy()), rel=1e-10
    )
    vectors = vid_loss(mean[:, :, 0, 0], target[:, :, 0, 0], variance).item()
    assert vectors == pytest.approx(ref_vid(mean[:, :, 0, 0].numpy(), target[:, :, 0, 0].numpy(), variance.numpy()))


@pytest.mark.parametrize("s_shape, t_shape", [((4, 3, 8, 8), (4, 5, 4, 4)), ((4, 3, 4, 4), (4, 5, 8, 8))])
def test_fitnet_regressor_and_loss_match_reference(s_shape, t_shape):
    regressor = Regressor(s_shape[1:], t_shape[1:], relu=True).double().train()
    s, t = rng_tensor(*s_shape, seed=12), rng_tensor(*t_shape, seed=13)
    conv = regressor.net[0]
    expected = ref_fitnet(s.numpy(), t.numpy(), conv.weight.detach()[:, :, 0, 0].numpy(), conv.bias.detach().numpy())
    assert fitnet_loss(*regressor(s, t)).item() == pytest.approx(expected, rel=1e-8)


def test_vid_starts_at_the_configured_variance():
    from kd_cli.methods.vid import VariationalHead

    head = VariationalHead((3, 4, 4), (5, 2, 2), init_variance=5.0, min_variance=1e-5)
    variance = torch.nn.functional.softplus(head.alpha) + head.min_variance
    assert torch.allclose(variance, torch.full((5,), 5.0))


# ---------------------------------------------------------------- gradients


def _gradcheck(loss, *inputs: torch.Tensor) -> None:
    inputs = tuple(x.clone().requires_grad_(True) for x in inputs)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)


def test_gradients_of_the_pure_losses():
    maps_s, maps_t = rng_tensor(3, 2, 4, 4, seed=14), rng_tensor(3, 3, 2, 2, seed=15)
    vec_s, vec_t = rng_tensor(4, 3, seed=16), rng_tensor(4, 5, seed=17)
    _gradcheck(lambda s: fitnet_loss(s, maps_s.flip(0)), maps_s)
    _gradcheck(lambda s: at_loss(s, maps_t, 2.0), maps_s)
    _gradcheck(lambda s: pkt_loss(s, vec_t), vec_s)
    _gradcheck(lambda s: rkd_distance_loss(s, vec_t), vec_s)
    _gradcheck(lambda s: rkd_angle_loss(s, vec_t), vec_s)
    _gradcheck(lambda s: sp_loss(s, maps_t), maps_s)
    _gradcheck(lambda s: cc_loss(s, vec_t, 0.4, 2), vec_s)
    variance = torch.tensor([0.5, 2.0], dtype=torch.float64)
    _gradcheck(lambda mean, var: vid_loss(mean, maps_s.flip(0), var), maps_s, variance)


# ---------------------------------------------------------------- edge cases


def test_identical_features_give_zero_loss():
    maps, vectors = rng_tensor(4, 3, 4, 4, seed=18), rng_tensor(4, 6, seed=19)
    assert fitnet_loss(maps, maps).item() == 0
    assert at_loss(maps, maps, 2.0).item() == 0
    assert sp_loss(maps, maps).item() == 0
    assert rkd_distance_loss(vectors, vectors).item() == 0
    assert rkd_angle_loss(vectors, vectors).item() == 0
    assert cc_loss(vectors, vectors, 0.4, 2).item() == 0
    assert abs(pkt_loss(vectors, vectors).item()) < 1e-12
    # VID: a perfect mean leaves only the variance term, and the mean gets no gradient
    mean, variance = maps.clone().requires_grad_(True), torch.full((3,), 2.0, dtype=torch.float64)
    loss = vid_loss(mean, maps, variance)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * math.log(2.0)) and mean.grad.abs().max() == 0


def test_relation_losses_scale_invariant_where_the_paper_says_so():
    # RKD normalises distances by their mean and uses angles; PKT and CC use cosines; SP normalises rows
    s, t = rng_tensor(5, 4, seed=20), rng_tensor(5, 4, seed=21)
    for loss in (rkd_distance_loss, rkd_angle_loss, pkt_loss, sp_loss, lambda a, b: cc_loss(a, b, 0.4, 2)):
        assert loss(3.0 * s, t).item() == pytest.approx(loss(s, t).item(), rel=1e-6)  # PKT: its eps


@pytest.mark.parametrize(
    "loss", [pkt_loss, rkd_distance_loss, rkd_angle_loss, sp_loss, lambda s, t: cc_loss(s, t, 0.4, 2)]
)
def test_relation_losses_refuse_a_batch_of_one(loss):
    with pytest.raises(KdError, match="at least 2 per batch.*trainer.batch_size"):
        loss(rng_tensor(1, 4), rng_tensor(1, 4, seed=1))


def test_per_sample_losses_work_on_a_batch_of_one():
    s, t = rng_tensor(1, 3, 8, 8), rng_tensor(1, 5, 4, 4, seed=1)
    assert torch.isfinite(at_loss(s, t, 2.0))
    regressor = Regressor((3, 8, 8), (5, 4, 4), relu=True).double().train()
    assert torch.isfinite(fitnet_loss(*regressor(s, t)))


# ---------------------------------------------------------------- the methods on real models


def method_config(name: str, **overrides) -> dict:
    return {**yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), **overrides}


@pytest.fixture(scope="module")
def cifar_models():
    """resnet8 (16/32/64 channels) as the student of resnet32x4 (64/128/256): unequal widths."""
    torch.manual_seed(0)
    return create_model("resnet8", 10), create_model("resnet32x4", 10)


def test_feature_method_yamls_keep_repdistillers_ce_1_and_no_kd_term():
    for name in METHODS:  # RepDistiller's -r 1 -a 0 (every key against the code: tests/test_registries.py)
        config = method_config(name)
        assert config["ce_weight"] == 1.0 and config["kd_weight"] == 0.0, name


DEFAULT_LAYERS = {
    "fitnet": ["layer2"],
    "at": ["layer1", "layer2", "layer3"],
    "vid": ["layer1", "layer2", "layer3"],
    "sp": ["layer3"],
    "pkt": ["pool"],
    "rkd": ["pool"],
    "cc": ["pool"],
}


@pytest.mark.parametrize("name", METHODS)
def test_method_on_unequal_widths_trains_the_student_and_its_adapters(name, cifar_models):
    student, teacher = cifar_models
    method = build_method(method_config(name), student, teacher)
    assert method.student_layers == method.teacher_layers == DEFAULT_LAYERS[name]
    images, labels = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    logits, terms = method(images, labels)
    assert logits.shape == (3, 10) and set(terms) == {"ce", *TERMS[name]}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    method.zero_grad()
    sum(terms.values()).backward()
    assert student.conv1.weight.grad.abs().sum() > 0
    adapters = [p for n, p in method.named_parameters() if not n.startswith("student.")]
    assert all(p.grad is not None for p in adapters)
    assert all(not k.startswith("student.") for k in method.extra_state())
    assert not any(k.startswith(("regressors", "heads", "embeds")) for k in student.state_dict())


@pytest.mark.parametrize("name", ["fitnet", "at", "vid", "sp", "cc"])
def test_map_pairs_with_unequal_grids(name, cifar_models):
    # resnet8's layer1 (16, 32, 32) against resnet32x4's layer2 (128, 16, 16), and layer2 against layer3
    student, teacher = cifar_models
    method = build_method(
        method_config(name, student_layers=["layer1", "layer2"], teacher_layers=["layer2", "layer3"]), student, teacher
    )
    logits, terms = method(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values())


def test_cc_embeds_only_when_the_shapes_differ(cifar_models):
    student, teacher = cifar_models
    method = build_method(method_config("cc"), student, teacher)
    assert method.embeds[0].net[0].in_features == 64 and method.embeds[0].net[0].out_features == 256
    same = build_method(method_config("cc"), student, create_model("resnet20", 10))
    assert same.embeds[0] is None and not any(True for _ in same.embeds.parameters())


def test_map_methods_reject_vectors_with_a_one_line_fix():
    mlp, cnn = create_model("mlp", 10, 1, 8), create_model("cnn", 10, 1, 8)
    with pytest.raises(KdError, match="needs feature maps.*student=cnn"):
        build_method(method_config("at", teacher_layers=["stages.1"]), mlp, cnn)
    for name in ("fitnet", "vid"):
        with pytest.raises(KdError, match="cannot pair student layer 'hidden.0'"):
            build_method(method_config(name, teacher_layers=["stages.1"]), mlp, cnn)
    # vector with vector is fine: a linear regressor / linear variational head
    for name in ("fitnet", "vid"):
        method = build_method(method_config(name), mlp, create_model("mlp", 10, 1, 8, hidden=[12]))
        _, terms = method(torch.randn(1, 1, 8, 8), torch.tensor([3]))  # a batch of one, too
        assert torch.isfinite(terms[name])


def test_impossible_options_are_kd_errors():
    student, teacher = create_model("cnn", 10, 1, 8, width=4), create_model("cnn", 10, 1, 8, width=8)
    with pytest.raises(KdError, match="min_variance < init_variance"):
        build_method(method_config("vid", min_variance=6.0), student, teacher)
    with pytest.raises(KdError, match="method.gamma=0 must be a number > 0"):
        build_method(method_config("cc", gamma=0), student, teacher)
    with pytest.raises(KdError, match="method.p"):
        build_method(method_config("at", p=0), student, teacher)
    with pytest.raises(KdError, match="as many of each"):
        build_method(method_config("at", student_layers=["stages.0"]), student, teacher)
    method = build_method(method_config("rkd"), student, teacher)
    with pytest.raises(KdError, match="at least 2 per batch"):
        method(torch.randn(1, 1, 8, 8), torch.tensor([0]))


# ---------------------------------------------------------------- the real CLI, every method

SMALL_CNN = ["student=cnn", "student.kwargs.width=8"]  # digits' default student is an MLP: no maps


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, short_teachers) -> dict[str, tuple[Path, object]]:
    out = tmp_path_factory.mktemp("feature_cli")
    common = [*SHORT, f"paths.outputs={out}"]
    wide = ["train-teacher", *common, *SYNTHETIC, "teacher=resnet32x4", "trainer.max_steps_per_epoch=1"]
    result = kd_here(*wide, f"hydra.run.dir={out / 'wide'}", cwd=out)
    assert result.code == 0, f"teacher wide: {result.stderr[-3000:]}"
    # One sweep per data set (one process runs every method in turn; each job its own run directory).
    # On digits every method gets the small CNN student: the map methods need maps, the others don't mind.
    sweep = ["distill", "-m", f"method={','.join(METHODS)}", *common, "hydra.sweep.subdir=${method.name}"]
    jobs = {
        "digits": [
            *sweep,
            f"teacher.checkpoint={short_teachers['digits']}",
            *SMALL_CNN,
            f"hydra.sweep.dir={out / 'digits-sweep'}",
        ],
        "cifar": [
            *sweep,
            f"teacher.checkpoint={short_teachers['cifar']}",
            "student=resnet8",
            *SYNTHETIC,
            f"hydra.sweep.dir={out / 'cifar-sweep'}",
        ],
        # resnet8x4 and resnet32x4 share stage widths: pairing shifted stages makes channels and grids differ
        "wide-vid": [
            "distill",
            "method=vid",
            f"teacher.checkpoint={out / 'wide'}",
            "student=resnet8x4",
            "method.student_layers=[layer1,layer2]",
            "method.teacher_layers=[layer2,layer3]",
            *SYNTHETIC,
            *common,
            f"hydra.run.dir={out / 'wide-vid'}",
        ],
    }
    results = kd_here_each(jobs, out)
    runs = {
        f"{data}-{method}": (out / f"{data}-sweep" / method, results[data])
        for data in ("digits", "cifar")
        for method in METHODS
    }
    return {**runs, "wide-vid": (out / "wide-vid", results["wide-vid"])}


def _check_run(run: Path, result, method: str) -> None:
    assert result.code == 0, f"{run.name} failed ({result.code}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    done = summary(run)
    assert done["status"] == "complete" and done["method"] == method and done["epochs"] == 1
    assert done["role"] == "student" and math.isfinite(done["last_train_loss"]) and done["last_top1"] is not None
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    for term in ["ce", *TERMS[method]]:
        assert math.isfinite(float(rows[0][f"train_{term}"])), term
    assert "train_kd" not in rows[0]  # RepDistiller's -a 0: no KD term by default
    assert (run / "model.safetensors").is_file()


@pytest.mark.parametrize("data", ["digits", "cifar"])
@pytest.mark.parametrize("method", METHODS)
def test_cli_distill_every_method(cli_runs, data, method):
    _check_run(*cli_runs[f"{data}-{method}"], method)


def test_cli_map_method_between_unequal_widths_and_grids(cli_runs):
    run, result = cli_runs["wide-vid"]
    _check_run(run, result, "vid")
    assert summary(run)["teacher_arch"] == "resnet32x4" and summary(run)["arch"] == "resnet8x4"
