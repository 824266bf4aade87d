"""MLKD (Jin, Wang & Lin, CVPR 2023): the three levels and the confidence masking against a float64
reference written here from the paper and the authors' KD_ours.py (explicit loops in numpy, never calling
the implementation), gradients, edge cases, the strong view made in the method (against PIL's ops, as the
authors' RandAugment applies them), the teacher cache serving the weak view only, and the real CLI on
digits and on CIFAR-shaped synthetic data with every term logged, one run resumed longer.
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
from kdrun import SHORT, SYNTHETIC, assert_one_line_error, kd_here, summary

from kd_cli.engine.teacher_cache import TeacherCache
from kd_cli.errors import KdError
from kd_cli.methods import build_method, check_method_options
from kd_cli.methods.mlkd import STRONG_OPS, _apply_ops, _geometric, confidence_masks, mlkd_losses, strong_view
from kd_cli.models.registry import create_model

CONFIG = Path(__file__).parents[1] / "configs" / "method" / "mlkd.yaml"
TEMPERATURES = [2.0, 3.0, 4.0, 5.0, 6.0]
TERMS = ["ce", "kd", "kd_strong", "batch", "class"]


def config(**overrides) -> dict:
    return {**yaml.safe_load(CONFIG.read_text()), **overrides}


def rng(*shape: int, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape) * scale


# ---------------------------------------------------------------- float64 reference (numpy, loops)


def ref_softmax(row: np.ndarray, temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def ref_masks(zt: np.ndarray, percentile: float) -> tuple[list[bool], list[bool]]:
    """The authors' masks: teacher softmax at T=1; a sample's top probability, a class's summed probability,
    each kept when <= np.percentile of the batch's (as KD_ours.py computes its thresholds)."""
    probs = [ref_softmax(row, 1.0) for row in zt]
    confidence = [max(p) for p in probs]
    class_confidence = [sum(p[k] for p in probs) for k in range(zt.shape[1])]
    sample_threshold = np.percentile(confidence, percentile)
    class_threshold = np.percentile(class_confidence, percentile)
    return [c <= sample_threshold for c in confidence], [c <= class_threshold for c in class_confidence]


def ref_levels(zs: np.ndarray, zt: np.ndarray, temperature: float) -> tuple[list[float], list[float], list[float]]:
    """Per-sample instance (T^2 KL), per-row batch and per-column class contributions at one temperature."""
    batch, classes = zs.shape
    ps = [ref_softmax(row, temperature) for row in zs]
    pt = [ref_softmax(row, temperature) for row in zt]
    instance = [
        temperature**2 * sum(pt[i][k] * math.log(pt[i][k] / ps[i][k]) for k in range(classes)) for i in range(batch)
    ]

    def gram(p, i, j):  # sample similarity
        return sum(p[i][k] * p[j][k] for k in range(classes))

    def correlation(p, a, b):  # class correlation
        return sum(p[i][a] * p[i][b] for i in range(batch))

    rows = [sum((gram(pt, i, j) - gram(ps, i, j)) ** 2 for j in range(batch)) / batch for i in range(batch)]
    columns = [
        sum((correlation(pt, a, b) - correlation(ps, a, b)) ** 2 for a in range(classes)) / classes
        for b in range(classes)
    ]
    return instance, rows, columns


def ref_mlkd(zs: np.ndarray, zt: np.ndarray, temperatures: list[float], masking: str, percentile: float) -> dict:
    keep, keep_classes = ref_masks(zt, percentile)
    batch = len(zs)
    totals = {"instance": 0.0, "batch": 0.0, "class": 0.0}
    for t in temperatures:
        instance, rows, columns = ref_levels(zs, zt, t)
        if masking == "reference":  # KD_ours.py: (scalar loss * mask).mean() = loss * fraction kept
            totals["instance"] += sum(instance) / batch * (sum(keep) / batch)
            totals["batch"] += sum(rows) * (sum(keep) / batch)
            totals["class"] += sum(columns) * (sum(keep_classes) / len(columns))
        elif masking == "per_sample":
            totals["instance"] += sum(v for v, k in zip(instance, keep) if k) / batch
            totals["batch"] += sum(v for v, k in zip(rows, keep) if k)
            totals["class"] += sum(v for v, k in zip(columns, keep_classes) if k)
        else:
            totals["instance"] += sum(instance) / batch
            totals["batch"] += sum(rows)
            totals["class"] += sum(columns)
    return totals


# ---------------------------------------------------------------- values, masks, gradients, edge cases


@pytest.mark.parametrize("masking", ["reference", "per_sample", "none"])
@pytest.mark.parametrize("batch, classes, percentile", [(6, 5, 50.0), (5, 7, 50.0), (4, 3, 30.0), (3, 4, 100.0)])
def test_the_three_levels_match_the_reference_with_each_masking(masking, batch, classes, percentile):
    zs, zt = rng(batch, classes, seed=batch), rng(batch, classes, seed=batch + 10, scale=3.0)
    got = mlkd_losses(torch.from_numpy(zs), torch.from_numpy(zt), TEMPERATURES, masking, percentile)
    expected = ref_mlkd(zs, zt, TEMPERATURES, masking, percentile)
    for level in ("instance", "batch", "class"):
        assert got[level].dtype == torch.float64
        assert got[level].item() == pytest.approx(expected[level], rel=1e-10), level


def test_the_masks_keep_the_less_confident_part_of_the_batch():
    """Even batch: the median falls between two values, half is kept; odd: the median sample too; 100: all;
    0: the least confident alone. Classes are kept by their probability summed over the batch."""
    teacher = torch.tensor([[4.0, 0, 0], [1.0, 0, 0], [0, 3.0, 0], [0, 0, 0.5]], dtype=torch.float64)
    keep, keep_classes = confidence_masks(teacher, 50.0)
    assert keep.tolist() == [False, True, False, True]  # confidences .96, .58, .91, .45
    assert keep_classes.tolist() == ref_masks(teacher.numpy(), 50.0)[1]
    assert confidence_masks(teacher[:3], 50.0)[0].tolist() == [False, True, True]
    assert confidence_masks(teacher, 100.0)[0].all() and confidence_masks(teacher, 0.0)[0].tolist() == [False] * 3 + [
        True
    ]


def test_reference_and_per_sample_masking_agree_when_every_sample_is_kept_and_equal_models_give_zero():
    zs, zt = torch.from_numpy(rng(5, 4, seed=1)), torch.from_numpy(rng(5, 4, seed=2))
    plain = mlkd_losses(zs, zt, [4.0], "none")
    for masking in ("reference", "per_sample"):
        full = mlkd_losses(zs, zt, [4.0], masking, percentile=100.0)
        assert all(torch.allclose(full[k], plain[k], rtol=1e-12) for k in plain)
    same = mlkd_losses(zt, zt, TEMPERATURES)
    assert all(abs(v.item()) < 1e-12 for v in same.values())


@pytest.mark.parametrize("masking", ["reference", "per_sample"])
def test_gradients_of_the_levels(masking):
    zt = torch.from_numpy(rng(4, 5, seed=3))
    for level in ("instance", "batch", "class"):

        def loss(z: torch.Tensor, level: str = level) -> torch.Tensor:
            return mlkd_losses(z, zt, [2.0, 5.0], masking, 50.0, levels=(level,))[level]

        assert torch.autograd.gradcheck(
            loss, (torch.from_numpy(rng(4, 5, seed=4)).requires_grad_(True),), eps=1e-6, atol=1e-8
        )


def tiny_models(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("cnn", 10, 1, 8, width=4), create_model("cnn", 10, 1, 8, width=8)


def test_the_method_weights_its_terms_as_the_authors_and_trains_the_student():
    student, teacher = tiny_models()
    method = build_method(config(), student, teacher)
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    torch.manual_seed(5)
    logits, terms = method(images, labels)
    assert set(terms) == set(TERMS) and all(torch.isfinite(v) and v > 0 for v in terms.values())
    torch.manual_seed(5)
    strong = strong_view(images)
    with torch.no_grad():
        weak_s, weak_t, strong_s, strong_t = student(images), teacher(images), student(strong), teacher(strong)
    weak = mlkd_losses(weak_s, weak_t, TEMPERATURES)
    expected = {
        "ce": 0.1
        * (torch.nn.functional.cross_entropy(weak_s, labels) + torch.nn.functional.cross_entropy(strong_s, labels)),
        "kd": 0.9 * weak["instance"],
        "batch": 0.9 * weak["batch"],
        "class": 0.9 * weak["class"],
        "kd_strong": 0.9 * mlkd_losses(strong_s, strong_t, TEMPERATURES, "none")["instance"],
    }
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-5), name
    torch.testing.assert_close(logits, weak_s, rtol=0, atol=0)  # the weak view's logits are the method's
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())


def test_one_view_when_asked():
    student, teacher = tiny_models()
    method = build_method(config(strong_view=False), student, teacher)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    images, labels = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    _, terms = method(images, labels)
    assert set(terms) == {"ce", "kd", "batch", "class"} and len(calls) == 1
    assert terms["ce"].item() == pytest.approx(
        0.1 * torch.nn.functional.cross_entropy(student(images), labels).item(), rel=1e-5
    )


def test_a_batch_of_one_is_refused_in_one_line_unless_the_batch_level_is_off():
    student, teacher = tiny_models()
    one = (torch.randn(1, 1, 8, 8), torch.tensor([3]))
    with pytest.raises(
        KdError, match=r"^method mlkd compares the samples of a batch .* got 1; raise trainer.batch_size$"
    ):
        build_method(config(), student, teacher)(*one)
    _, terms = build_method(config(batch_weight=0.0), student, teacher)(*one)
    assert set(terms) == {"ce", "kd", "kd_strong", "class"} and all(torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperatures": []}, "method.temperatures is empty"),
        (
            {"temperatures": [4.0, 0.0]},
            "method.temperatures=[4.0, 0.0] must be a list whose items are each a number > 0",
        ),
        ({"mean": [0.5]}, "method.mean and method.std go together"),
        ({"mean": [0.5, 0.4], "std": [0.2]}, "method.mean has 2 value(s) but method.std has 1"),
        ({"mask_percentile": 101.0}, "method.mask_percentile=101.0 must be a number in [0, 100]"),
        ({"masking": "paper"}, "method.masking='paper' must be one of reference, per_sample, none"),
    ],
)
def test_impossible_options_are_one_line_errors(options, message):
    with pytest.raises(KdError) as error:
        check_method_options(config(**options))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_shipped_yaml_passes_its_checks():
    check_method_options(config())  # (its keys against the constructor: tests/test_registries.py)


def test_statistics_for_other_channels_are_refused_when_built():
    student, teacher = tiny_models()
    with pytest.raises(KdError, match=r"method.mean/std have 3 value\(s\) but the images have 1 channel"):
        build_method(config(mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]), student, teacher)


# ---------------------------------------------------------------- the strong view

MEAN, STD = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("stats", [False, True])
def test_the_strong_view_is_another_tensor_of_the_same_shape_drawn_per_sample_and_repeatable(stats):
    images = normalised(torch.randint(0, 256, (8, 3, 16, 16)).float() / 255)
    kwargs = {"mean": MEAN, "std": STD} if stats else {}
    torch.manual_seed(0)
    first = strong_view(images, **kwargs)
    torch.manual_seed(0)
    again = strong_view(images, **kwargs)
    torch.manual_seed(1)
    other = strong_view(images, **kwargs)
    assert first.shape == images.shape and first.dtype == images.dtype and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.equal(first, other)
    changed = (first != images).flatten(1).float().mean(1)
    assert (changed > 0).sum() >= 6  # (an identity op twice and an empty cutout leave an image as it was)
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(
        strong_view(images, generator=generator, **kwargs),
        strong_view(images, generator=torch.Generator().manual_seed(3), **kwargs),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the view is made in fp32 whatever the loop's precision
        torch.manual_seed(0)
        assert torch.equal(strong_view(images, **kwargs), first)
    torch.manual_seed(0)
    last = strong_view(images.contiguous(memory_format=torch.channels_last), **kwargs)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, first)


def pil_image(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(pixels)


def as_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


def one_op(name: str, pixels: torch.Tensor, value: float, colour: bool = True) -> torch.Tensor:
    low, high = STRONG_OPS[name]
    names = list(STRONG_OPS)
    level = torch.tensor([(value - low) / (high - low)])
    return _apply_ops(pixels, torch.tensor([names.index(name)]), level, names, colour=colour)


def test_the_ops_are_the_authors_pil_ops_on_8_bit_images():
    """Geometric ops to the pixel (nearest-neighbour, black corners, PIL's centres and origins); colour ops
    within 1.5 8-bit levels (PIL rounds each step, its grey image too, to 8 bits; kd stays in float)."""
    from PIL import Image, ImageEnhance, ImageOps

    array = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image, pixels = pil_image(array), torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255
    geometric = {
        "rotate": (17.0, lambda v: image.rotate(v)),
        "shear_x": (0.13, lambda v: image.transform(image.size, Image.AFFINE, (1, v, 0, 0, 1, 0))),
        "shear_y": (-0.17, lambda v: image.transform(image.size, Image.AFFINE, (1, 0, 0, v, 1, 0))),
        "translate_x": (0.25, lambda v: image.transform(image.size, Image.AFFINE, (1, 0, v * 16, 0, 1, 0))),
        "translate_y": (-0.2, lambda v: image.transform(image.size, Image.AFFINE, (1, 0, 0, 0, 1, v * 16))),
    }
    for name, (value, pil) in geometric.items():
        assert torch.equal(one_op(name, pixels, value), as_tensor(pil(value))), name
    colour = {
        "brightness": (0.3, lambda v: ImageEnhance.Brightness(image).enhance(v)),
        "color": (0.3, lambda v: ImageEnhance.Color(image).enhance(v)),
        "contrast": (0.7, lambda v: ImageEnhance.Contrast(image).enhance(v)),
        "sharpness": (0.3, lambda v: ImageEnhance.Sharpness(image).enhance(v)),
        "posterize": (5.5, lambda v: ImageOps.posterize(image, int(v))),
        "solarize": (100.0, lambda v: ImageOps.solarize(image, v)),
        "autocontrast": (0.5, lambda v: ImageOps.autocontrast(image)),
        "equalize": (0.5, lambda v: ImageOps.equalize(image)),
        "identity": (0.5, lambda v: image),
    }
    for name, (value, pil) in colour.items():
        difference = (one_op(name, pixels, value) - as_tensor(pil(value))).abs().max().item()
        assert difference <= 1.5 / 255, (name, difference)
        if name != "identity":  # without the data set's statistics a colour op is drawn but does nothing
            assert torch.equal(one_op(name, pixels, value, colour=False), pixels), name


def test_geometric_ops_act_on_normalised_images_as_on_pixels_except_the_uncovered_corners():
    pixels = torch.rand(1, 3, 16, 16)
    names = list(STRONG_OPS)
    choice, level = torch.tensor([names.index("rotate")]), torch.tensor([0.9])
    in_pixels, in_place = _geometric(pixels, choice, level, names), _geometric(normalised(pixels), choice, level, names)
    covered = _geometric(torch.ones_like(pixels), choice, level, names) > 0
    torch.testing.assert_close(in_place[covered], normalised(in_pixels)[covered])
    assert (in_place[~covered] == 0).all() and (~covered).any()  # 0: the data set's mean colour


# ---------------------------------------------------------------- the teacher cache serves the weak view only


def test_the_teacher_cache_serves_the_weak_view_and_the_teacher_runs_on_the_strong_one(tmp_path):
    student, teacher = tiny_models()
    seen: list[torch.Tensor] = []
    teacher.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    batches = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]

    def epoch(method) -> list[dict]:
        terms = []
        for step, batch in enumerate(batches):
            torch.manual_seed(100 + step)
            terms.append({k: v.detach() for k, v in method(*batch)[1].items()})
        return terms

    plain = build_method(config(), *tiny_models()[:1], teacher)
    expected = epoch(plain)
    seen.clear()
    method = build_method(config(), student, teacher)
    assert method.teacher_cache_outputs() == []
    cache = TeacherCache(tmp_path, {"teacher": "t"}, max_bytes=2**30)
    cache.start(steps=len(batches), features=method.teacher_cache_outputs())
    method.teacher_outputs = cache
    with cache.epoch(0, torch.device("cpu")):
        filled = epoch(method)
    assert len(seen) == 4  # filling: the teacher sees each weak batch and each strong view
    from safetensors.torch import load_file

    stored = load_file(str(cache.entry / "epoch-00000.safetensors"))
    for step, (images, _) in enumerate(batches):  # what is stored is the weak batch's, never the strong view's
        torch.testing.assert_close(stored["logits"][step], teacher(images), rtol=0, atol=0)
        assert stored["checksums"][step].item() == images.double().sum().item()
    seen.clear()
    method = build_method(config(), *tiny_models()[:1], teacher)
    method.teacher_outputs = cache
    with cache.epoch(0, torch.device("cpu")):
        read = epoch(method)
    assert cache.summary()["epochs_read"] == 1
    assert len(seen) == 2  # reading: the teacher runs on the strong views alone
    for step, (images, _) in enumerate(batches):
        torch.manual_seed(100 + step)
        assert torch.equal(seen[step], strong_view(images)) and not torch.equal(seen[step], images)
    for got in (filled, read):
        for step in range(len(batches)):
            assert got[step].keys() == expected[step].keys()
            assert all(torch.equal(got[step][k], expected[step][k]) for k in got[step])


# ---------------------------------------------------------------- the real CLI

STATS = ["method.mean=${dataset.mean}", "method.std=${dataset.std}"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, short_teachers) -> Path:
    out = tmp_path_factory.mktemp("mlkd_cli")
    common = [*SHORT, f"paths.outputs={out}"]
    digits, cifar = (f"teacher.checkpoint={short_teachers[data]}" for data in ("digits", "cifar"))
    runs = {
        "digits": [digits],
        "digits-cached": [digits],  # the same stream: reads the first one's
        "cifar": [cifar, "student=resnet8", *SYNTHETIC, *STATS],
    }
    for name, extra in runs.items():
        result = kd_here("distill", "method=mlkd", *common, *extra, f"hydra.run.dir={out / name}", cwd=out)
        assert result.code == 0, result.stderr[-3000:]
    return out


def rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("data", ["digits", "cifar"])
def test_cli_distill_logs_every_term(cli_runs, data):
    run = cli_runs / data
    done = summary(run)
    assert done["status"] == "complete" and done["method"] == "mlkd" and done["role"] == "student"
    row = rows(run)[0]
    for term in TERMS:
        assert math.isfinite(float(row[f"train_{term}"])) and float(row[f"train_{term}"]) > 0, term
    config_used = yaml.safe_load((run / "config_resolved.yaml").read_text())["method"]
    assert (config_used["mean"] is not None) == (data == "cifar")  # the data set's statistics, by interpolation


def test_cli_a_run_reading_the_teacher_cache_trains_as_the_run_that_filled_it(cli_runs):
    """The weak view's logits come from the cache, the strong view's from the teacher: the same bits."""
    filled, read = summary(cli_runs / "digits")["teacher_cache"], summary(cli_runs / "digits-cached")["teacher_cache"]
    assert (filled["epochs_read"], filled["epochs_computed"]) == (0, 1)
    assert (read["epochs_read"], read["epochs_computed"]) == (1, 0) and read["key"] == filled["key"]
    timing = {"images_per_s", "seconds"}
    filled_rows, read_rows = (
        [{k: v for k, v in r.items() if k not in timing} for r in rows(cli_runs / name)]
        for name in ("digits", "digits-cached")
    )
    assert filled_rows == read_rows


def test_cli_a_batch_of_one_stops_before_training_in_one_line(short_teachers, tmp_path):
    result = kd_here(
        "distill",
        "method=mlkd",
        *SHORT,
        "trainer.batch_size=1",
        f"paths.outputs={tmp_path}",
        f"teacher.checkpoint={short_teachers['digits']}",
        f"hydra.run.dir={tmp_path / 'one'}",
        cwd=tmp_path,
    )
    assert_one_line_error(result, "method mlkd compares the samples of a batch", "raise trainer.batch_size")


def test_cli_an_mlkd_run_resumes_longer(cli_runs, tmp_path):
    run = tmp_path / "mlkd"
    shutil.copytree(cli_runs / "digits", run)
    (run / "summary.json").write_text(json.dumps({**summary(run), "status": "interrupted"}))
    result = kd_here("distill", f"resume={run}", "trainer.epochs=2", "resume_extend=true", cwd=cli_runs)
    assert result.code == 0, result.stderr[-3000:]
    done = summary(run)
    assert (
        done["status"] == "complete" and done["epochs"] == 2 and done["resumes"][-1]["changes"] == ["trainer.epochs=2"]
    )
    assert [row["epoch"] for row in rows(run)] == ["1", "2"]
    assert all(float(row[f"train_{term}"]) > 0 for row in rows(run) for term in TERMS)
