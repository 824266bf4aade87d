"""The logit methods (kd, dkd, dist, and logit standardization on each): every loss against a float64
reference written from the paper's equations (explicit loops, numpy), gradients by gradcheck, edge
cases, and each method end to end through the real CLI on digits and on CIFAR-shaped synthetic data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from kdrun import SHORT, SYNTHETIC, assert_one_line_error, kd_here_each, summary
from omegaconf import OmegaConf
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import build_method
from kd_cli.methods.dist import dist_losses, inter_class_relation, intra_class_relation
from kd_cli.methods.dkd import dkd_losses, warmup_factor
from kd_cli.methods.logit_utils import kd_loss

CONFIGS = Path(__file__).parents[1] / "configs" / "method"
T = 4.0


# ---------------------------------------------------------------- float64 references, from the papers


def softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q)))


def zscore(row: np.ndarray) -> np.ndarray:
    """Sun et al. 2024: (z - mean) / (std + eps), std with Bessel's correction as in the authors' code."""
    return (row - row.mean()) / (row.std(ddof=1) + 1e-7)


def prepared(logits: torch.Tensor, standardize: bool) -> list[np.ndarray]:
    rows = [np.array(r, dtype=np.float64) for r in logits.tolist()]
    return [zscore(r) if standardize else r for r in rows]


def reference_kd(s, t, temperature, standardize=False) -> float:
    pairs = zip(prepared(s, standardize), prepared(t, standardize))
    kls = [kl(softmax(ti / temperature), softmax(si / temperature)) for si, ti in pairs]
    return temperature**2 * float(np.mean(kls))


def reference_dkd(s, t, labels, temperature, standardize=False) -> tuple[float, float]:
    """Zhao et al. 2022, section 3.1: b = [p_target, 1 - p_target]; p_hat_i = p_i / (1 - p_target) for i != target."""
    tckd = nckd = 0.0
    for si, ti, y in zip(prepared(s, standardize), prepared(t, standardize), labels.tolist()):
        ps, pt = softmax(si / temperature), softmax(ti / temperature)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        others = [c for c in range(len(ps)) if c != y]
        nckd += kl(pt[others] / (1 - pt[y]), ps[others] / (1 - ps[y]))
    return temperature**2 * tckd / len(s), temperature**2 * nckd / len(s)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    da, db = a - a.mean(), b - b.mean()
    return float((da * db).sum() / np.sqrt((da * da).sum() * (db * db).sum()))


def soft(logits: torch.Tensor, temperature: float, standardize: bool) -> np.ndarray:
    return np.stack([softmax(r / temperature) for r in prepared(logits, standardize)])


def reference_dist(s, t, temperature, standardize=False) -> tuple[float, float]:
    """Huang et al. 2022: 1 - Pearson per sample (inter) and per class (intra), times tau^2."""
    ps, pt = soft(s, temperature, standardize), soft(t, temperature, standardize)
    inter = 1 - np.mean([pearson(ps[i], pt[i]) for i in range(ps.shape[0])])
    intra = 1 - np.mean([pearson(ps[:, c], pt[:, c]) for c in range(ps.shape[1])])
    return temperature**2 * inter, temperature**2 * intra


# ---------------------------------------------------------------- fixtures for the unit tests


def logits(batch: int, classes: int = 6, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        scale * torch.randn(batch, classes, generator=g, dtype=torch.float64),
        scale * torch.randn(batch, classes, generator=g, dtype=torch.float64),
    )


def labels_for(batch: int, classes: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(classes, (batch,), generator=torch.Generator().manual_seed(seed))


def affine_per_sample(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x * a_i + b_i with a positive scale and a shift drawn per sample (row)."""
    g = torch.Generator().manual_seed(seed)
    scale = 0.2 + 3 * torch.rand(len(x), 1, generator=g, dtype=x.dtype)
    return x * scale + 10 * torch.randn(len(x), 1, generator=g, dtype=x.dtype)


def all_losses(s, t, labels, standardize) -> list[torch.Tensor]:
    return [
        kd_loss(s, t, T, logit_standardization=standardize),
        *dkd_losses(s, t, labels, T, logit_standardization=standardize),
        *dist_losses(s, t, T, logit_standardization=standardize),
    ]


# ---------------------------------------------------------------- values against the references


@pytest.mark.parametrize("standardize", [False, True])
def test_kd_loss_matches_reference(standardize):
    s, t = logits(5)
    assert kd_loss(s, t, T, logit_standardization=standardize).item() == pytest.approx(
        reference_kd(s, t, T, standardize), rel=1e-10
    )


def test_kd_loss_keeps_its_three_argument_call():
    s, t = logits(5)
    assert kd_loss(s, t, 2.0).item() == pytest.approx(reference_kd(s, t, 2.0), rel=1e-10)


@pytest.mark.parametrize("standardize", [False, True])
def test_dkd_matches_reference(standardize):
    s, t = logits(7)
    labels = labels_for(7)
    tckd, nckd = dkd_losses(s, t, labels, T, logit_standardization=standardize)
    want = reference_dkd(s, t, labels, T, standardize)
    assert (tckd.item(), nckd.item()) == pytest.approx(want, rel=1e-10)


def test_dkd_parts_recompose_kd_per_sample():
    # The paper's reformulation of KD: KD = TCKD + (1 - p_target^teacher) * NCKD, sample by sample
    s, t = logits(4)
    labels = labels_for(4)
    for i in range(4):
        si, ti, yi = s[i : i + 1], t[i : i + 1], labels[i : i + 1]
        tckd, nckd = dkd_losses(si, ti, yi, T)
        teacher_target = torch.softmax(ti / T, dim=1)[0, yi].item()
        assert (tckd + (1 - teacher_target) * nckd).item() == pytest.approx(kd_loss(si, ti, T).item(), rel=1e-10)


def test_dkd_stays_finite_for_a_confident_model():
    # p_target rounds to 1 in float32: 1 - p_target is 0 and a plain log(1 - p) would be -inf
    s, t = logits(4)
    labels = labels_for(4)
    s = s.float()
    s[torch.arange(4), labels] = 500.0
    tckd, nckd = dkd_losses(s, t.float(), labels, 1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd)


@pytest.mark.parametrize("standardize", [False, True])
def test_dist_matches_reference(standardize):
    s, t = logits(8)
    inter, intra = dist_losses(s, t, T, logit_standardization=standardize)
    want = reference_dist(s, t, T, standardize)
    assert (inter.item(), intra.item()) == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("standardize", [False, True])
def test_gradients_match_finite_differences(standardize):
    s, t = logits(4, classes=5, scale=1.5)
    s.requires_grad_(True)
    labels = labels_for(4, classes=5)
    checks = {
        "kd": lambda x: kd_loss(x, t, T, logit_standardization=standardize),
        "dkd": lambda x: dkd_losses(x, t, labels, T, logit_standardization=standardize),
        "dist": lambda x: dist_losses(x, t, T, logit_standardization=standardize),
    }
    for name, fn in checks.items():
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-6), name


# ---------------------------------------------------------------- edge cases


def test_batch_of_one_kd_and_dkd_match_the_reference():
    s, t = logits(1)
    labels = labels_for(1)
    assert kd_loss(s, t, T).item() == pytest.approx(reference_kd(s, t, T), rel=1e-10)
    tckd, nckd = dkd_losses(s, t, labels, T)
    assert (tckd.item(), nckd.item()) == pytest.approx(reference_dkd(s, t, labels, T), rel=1e-10)


def test_batch_of_one_dist_inter_is_defined_but_intra_is_a_one_line_error():
    s, t = logits(1)
    p_s, p_t = torch.softmax(s / T, dim=1), torch.softmax(t / T, dim=1)
    want = 1 - pearson(soft(s, T, False)[0], soft(t, T, False)[0])
    assert inter_class_relation(p_s, p_t).item() == pytest.approx(want, rel=1e-9)
    with pytest.raises(KdError, match="at least 2 samples") as error:
        intra_class_relation(p_s, p_t)
    assert "\n" not in str(error.value) and "method.gamma=0" in str(error.value)


def test_dist_with_gamma_zero_trains_on_a_batch_of_one():
    method = build(dict(load_yaml("dist"), gamma=0.0))
    _, terms = method(torch.randn(1, 4), torch.tensor([2]))
    assert set(terms) == {"ce", "inter"}


@pytest.mark.parametrize("standardize", [False, True])
def test_equal_student_and_teacher_give_zero_loss(standardize):
    s, _ = logits(6)
    for value in all_losses(s, s.clone(), labels_for(6), standardize):
        assert abs(value.item()) < 1e-12


@pytest.mark.parametrize(("epoch", "factor"), [(0, 1 / 20), (18, 19 / 20), (19, 1.0), (20, 1.0), (239, 1.0)])
def test_dkd_warmup_factor(epoch, factor):
    assert warmup_factor(epoch, 20) == pytest.approx(factor)


def test_dkd_warmup_zero_or_one_means_none():
    assert warmup_factor(0, 0) == warmup_factor(0, 1) == 1.0


def test_dkd_forward_ramps_its_kd_terms_only():
    method = build(load_yaml("dkd"))  # warmup 20
    images, labels = torch.randn(8, 4), torch.randint(3, (8,))
    by_epoch = {}
    for epoch in (0, 19, 30):
        method.start_epoch(epoch, 40)
        by_epoch[epoch] = {k: v.item() for k, v in method(images, labels)[1].items()}
    for term in ("tckd", "nckd"):
        assert by_epoch[0][term] == pytest.approx(by_epoch[19][term] / 20)
        assert by_epoch[30][term] == pytest.approx(by_epoch[19][term])
    assert by_epoch[0]["ce"] == pytest.approx(by_epoch[19]["ce"])


def test_logit_standardization_ignores_each_samples_shift_and_scale():
    s, t = logits(6)
    labels = labels_for(6)
    base = all_losses(s, t, labels, True)
    moved = all_losses(affine_per_sample(s, 2), affine_per_sample(t, 3), labels, True)
    assert [m.item() for m in moved] == pytest.approx([b.item() for b in base], rel=1e-6)
    plain = all_losses(affine_per_sample(s, 2), affine_per_sample(t, 3), labels, False)
    assert plain[0].item() != pytest.approx(all_losses(s, t, labels, False)[0].item(), rel=1e-3)


# ---------------------------------------------------------------- options: the YAML and the constructor


def load_yaml(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))


class Tiny(nn.Linear):
    """A linear 'model' over 4 features and 3 classes: the methods only need logits."""

    def __init__(self):
        super().__init__(4, 3)


def build(cfg: dict):
    torch.manual_seed(0)
    return build_method(cfg, Tiny(), Tiny())


@pytest.mark.parametrize("name", ["kd", "dkd", "dist"])
def test_logit_standardization_is_off_in_the_published_recipes(name):
    assert load_yaml(name)["logit_standardization"] is False  # (every key: tests/test_registries.py)


@pytest.mark.parametrize(
    ("name", "terms"), [("kd", {"ce", "kd"}), ("dkd", {"ce", "tckd", "nckd"}), ("dist", {"ce", "inter", "intra"})]
)
def test_forward_returns_the_named_terms(name, terms):
    for standardize in (False, True):
        logits_out, found = build(dict(load_yaml(name), logit_standardization=standardize))(
            torch.randn(5, 4), torch.randint(3, (5,))
        )
        assert logits_out.shape == (5, 3) and set(found) == terms
        assert all(v.ndim == 0 and torch.isfinite(v) for v in found.values())


@pytest.mark.parametrize("name", ["kd", "dkd", "dist"])
def test_forward_terms_are_the_published_weights_times_the_pure_losses(name):
    """The shipped YAML's weights on the checked loss functions: what metrics.csv logs per term."""
    cfg = load_yaml(name)
    method = build(cfg)
    images, labels = torch.randn(5, 4), torch.randint(3, (5,))
    _, terms = method(images, labels)
    with torch.no_grad():
        s, t, temperature = method.student(images).float(), method.teacher(images).float(), cfg["temperature"]
        expected = {"ce": cfg["ce_weight"] * torch.nn.functional.cross_entropy(s, labels)}
        if name == "kd":
            expected["kd"] = cfg["kd_weight"] * kd_loss(s, t, temperature)
        elif name == "dkd":
            ramp, (tckd, nckd) = warmup_factor(0, cfg["warmup"]), dkd_losses(s, t, labels, temperature)
            expected.update(tckd=ramp * cfg["alpha"] * tckd, nckd=ramp * cfg["beta"] * nckd)
        else:
            inter, intra = dist_losses(s, t, temperature)
            expected.update(inter=cfg["beta"] * inter, intra=cfg["gamma"] * intra)
    assert set(terms) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(terms[key].detach(), value, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [("dkd", "temperature", 0.0), ("dkd", "warmup", -1), ("dist", "temperature", -2.0), ("kd", "temperature", 0.0)],
)
def test_impossible_options_are_one_line_errors(name, option, value):
    with pytest.raises(KdError, match=f"method.{option}") as error:
        build(dict(load_yaml(name), **{option: value}))
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- end to end through the CLI

ONE_STEP = SHORT
METHOD_NAMES = ["kd", "dkd", "dist"]
# Each data set runs the three methods as one Hydra sweep (`-m method=kd,dkd,dist`): one process, so
# torch is imported once per data set, not once per method; every method still gets its own run
# directory (named after it). The synthetic sweep turns logit standardization on, so both paths run.
SWEEPS = {
    "digits": [],
    "synthetic": [*SYNTHETIC, "teacher=resnet20", "student=resnet8", "method.logit_standardization=true"],
}
TERMS = {
    "kd": ["train_kd", "train_ce"],
    "dkd": ["train_ce", "train_tckd", "train_nckd"],
    "dist": ["train_ce", "train_inter", "train_intra"],
}
DATA = {"digits": "digits", "synthetic": "cifar"}  # the sweep -> the session's short teacher it distils from


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logit_methods")


@pytest.fixture(scope="module")
def distilled(outputs, short_teachers) -> dict:
    """The two method sweeps and DIST on a batch of one, run by the CLI in this process."""
    common = [*ONE_STEP, f"paths.outputs={outputs}"]
    jobs = {
        data: [
            "distill",
            "-m",
            f"method={','.join(METHOD_NAMES)}",
            *extra,
            f"teacher.checkpoint={short_teachers[DATA[data]]}",
            *common,
            f"hydra.sweep.dir={outputs / data}",
            "hydra.sweep.subdir=${method.name}",
        ]
        for data, extra in SWEEPS.items()
    }
    jobs["dist_batch_of_one"] = [
        "distill",
        "method=dist",
        "trainer.batch_size=1",
        f"teacher.checkpoint={short_teachers['digits']}",
        *common,
        f"hydra.run.dir={outputs / 'dist_batch_of_one'}",
    ]
    return kd_here_each(jobs, outputs)


@pytest.mark.parametrize("data", list(SWEEPS))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_distill_end_to_end(distilled, outputs, data, method):
    result = distilled[data]
    run = outputs / data / method
    assert (run / "summary.json").exists(), f"{data}/{method} wrote no summary:\n{result.stderr[-3000:]}"
    done = summary(run)
    assert done["status"] == "complete", f"{data}/{method}: {done.get('error')}"
    assert done["method"] == method and done["epochs"] == 1 and done["last_top1"] is not None
    assert np.isfinite(done["last_train_loss"])
    config = OmegaConf.load(run / "config_resolved.yaml")
    assert config.method.logit_standardization == (data == "synthetic")
    if data == "synthetic":
        assert (config.teacher.arch, config.student.arch) == ("resnet20", "resnet8")
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    for column in TERMS[method]:
        assert np.isfinite(float(rows[0][column])), column
    assert result.code == 0, result.stderr[-3000:]


def test_dist_on_a_batch_of_one_says_why_in_one_line(distilled):
    assert_one_line_error(distilled["dist_batch_of_one"], "at least 2 samples", "method.gamma=0")
