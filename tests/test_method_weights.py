"""Every method names the options that weight its loss terms (`loss_weights`): all of them 0 is
refused before any work (the loss would be 0 whatever the student does), and a term whose weight is
0 is left out of `forward` (not computed, not logged, no adapter left without a gradient).

Parametrized over the METHODS registry, so a newly registered method is covered here without a new
test: it must declare its loss weights, and its forward must leave out the terms weighted 0.
In-process, on tiny CNNs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from kd_cli.errors import KdError
from kd_cli.methods import FIXED, METHODS, build_method, check_method_options, method_tasks
from kd_cli.models import create_model
from kd_cli.registry import entry_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"
# Options the shipped YAML cannot hold a value for: the user must give them.
USER_GIVEN = {"ensemble": {"teachers": ["runs/a", "runs/b"]}}


def config(name: str, **options) -> dict:
    yaml = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"), resolve=True)
    return {**yaml, **USER_GIVEN.get(name, {}), **options}


def loss_weights(name: str) -> tuple[str, ...]:
    """The method's own declaration (not inherited: a subclass may add or drop terms), checked
    against its options: every `*_weight` option is one of them."""
    cls = METHODS.get(name)
    assert "loss_weights" in vars(cls) and cls.loss_weights, f"method {name} declares no loss_weights"
    params, _ = entry_parameters(cls)
    options = {n for n, p in params.items() if n not in FIXED and p.kind is p.KEYWORD_ONLY}
    assert set(cls.loss_weights) <= options, name
    assert {o for o in options if o.endswith("_weight")} <= set(cls.loss_weights), name
    return cls.loss_weights


def several() -> list[tuple[str, str]]:
    """(method, weight) for each weight of each method that has more than one."""
    return [
        (name, w)
        for name in METHODS.names()
        for w in METHODS.get(name).loss_weights
        if len(METHODS.get(name).loss_weights) > 1
    ]


@pytest.mark.parametrize("name", METHODS.names())
def test_every_loss_weight_zero_is_refused_naming_the_method(name):
    weights = loss_weights(name)
    with pytest.raises(KdError, match=rf"^method={name}: ") as error:
        check_method_options(config(name, **{w: 0.0 for w in weights}))
    message = str(error.value)
    assert "nothing would be learned" in message and "\n" not in message
    assert all(f"method.{w}" in message for w in weights), message


@pytest.mark.parametrize(("name", "weight"), several())
def test_one_loss_weight_zero_is_accepted(name, weight):
    others = {w: 1.0 for w in loss_weights(name) if w != weight}
    check_method_options(config(name, **others, **{weight: 0.0}))


def test_the_issue_example():
    with pytest.raises(
        KdError,
        match=r"^method=kd: every loss weight is 0 \(method\.kd_weight, method\.ce_weight\), "
        r"so nothing would be learned; give one a weight > 0$",
    ):
        check_method_options(config("kd", kd_weight=0, ce_weight=0))
    with pytest.raises(KdError, match=r"^method=none: its only loss weight method\.ce_weight is 0"):
        check_method_options(config("none", ce_weight=0))
    # uniform targets: nothing to learn either
    with pytest.raises(KdError, match=r"^method\.label_smoothing=1 must be a number in \[0, 1\) \(method 'none'\)$"):
        check_method_options(config("none", label_smoothing=1))
    check_method_options(config("none", label_smoothing=0.99))


# ---------------------------------------------------------------- forward leaves the term out


def segmentation_only(name: str) -> bool:
    return "classification" not in method_tasks(name)


def method(name: str, monkeypatch, **options):
    torch.manual_seed(0)
    if name == "roi_kd":  # the ROI head's KD: a Faster R-CNN pair
        student = create_model("fasterrcnn_mobilenet_v3_large_fpn", 4, 1, 32)
        teacher = create_model("fasterrcnn_mobilenet_v3_large_fpn", 4, 1, 32)
        return build_method(config(name, **options), student, teacher, task="detection")
    if "detection" in method_tasks(name):  # FPN methods: a small detector pair
        student, teacher = create_model("kd_fcos_tiny", 4, 1, 32), create_model("kd_fcos", 4, 1, 32, width=8)
        return build_method(config(name, **options), student, teacher, task="detection")
    if segmentation_only(name):  # per-pixel methods: a small segmenter pair
        student, teacher = create_model("segcnn_tiny", 10, 1, 8), create_model("segcnn", 10, 1, 8, width=8)
        return build_method(config(name, **options), student, teacher, task="segmentation")
    student = create_model("cnn", 10, 1, 8, width=4)
    teacher = create_model("cnn", 10, 1, 8, width=4 if name == "fsp" else 8)  # FSP pairs equal widths
    # ensemble's teachers come from run directories: here a loader that gives the teacher above for each
    return build_method(
        config(name, **options),
        student,
        teacher,
        num_samples=32,
        new_student=lambda: create_model("cnn", 10, 1, 8, width=4),
        load_model=lambda path: (teacher, SimpleNamespace(in_channels=1, input_size=8)),
    )


def terms_of(built, seed: int = 1) -> dict[str, torch.Tensor]:
    """The terms of the first epoch and of a late one (FSP's initialisation phase has terms of its own)."""
    torch.manual_seed(seed)
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    if built.task.name == "segmentation":
        labels = torch.randint(0, 10, (4, 8, 8))
    if built.task.name == "detection":  # 32 px scenes, a box each
        images = torch.randn(4, 1, 32, 32)
        labels = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]]), "labels": torch.tensor([k])} for k in range(4)]
    extra = (torch.arange(4),) if built.needs_index else ()
    torch.manual_seed(seed)  # the same random draws in the method (CRD's negatives) for every build
    terms = {}
    for epoch in (0, 99):
        built.start_epoch(epoch, 100)
        terms.update(built(images, labels, *extra)[1])
    return terms


@pytest.mark.parametrize(("name", "weight"), several())
def test_a_term_weighted_zero_is_left_out_and_every_parameter_still_learns(name, weight, monkeypatch):
    on = {w: 1.0 for w in loss_weights(name)}
    all_terms = terms_of(method(name, monkeypatch, **on))
    built = method(name, monkeypatch, **{**on, weight: 0.0})
    terms = terms_of(built)
    assert set(terms) < set(all_terms), (weight, set(terms), set(all_terms))
    for key, value in terms.items():  # the other terms are exactly what they were
        if (name, weight) == ("one", "ensemble_weight") and key.endswith("one"):
            continue  # ONE's gate learns from the ensemble's CE only: without it the KL target is the branches' mean
        assert torch.equal(value, all_terms[key]), key
    sum(terms.values()).backward()
    # no adapter is left without a gradient (DDP refuses parameters that take no part in the loss)
    assert [n for n, p in built.named_parameters() if p.requires_grad and p.grad is None] == []
