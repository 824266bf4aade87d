"""Every method at its published defaults (its YAML, as a user gets it) on the literature's CIFAR pair,
resnet56 -> resnet20 at 100 classes, for a few SGD steps at kd's default optimiser settings, in every
phase it has (an initialisation phase, then the distillation): the loss stays finite and every term is
there. The teacher is the kind a short `kd train-teacher` leaves: a few steps on CIFAR-shaped random
data, its BatchNorm statistics far from calibrated, so its feature maps reach magnitudes of 10-100 in
eval mode (FT's paraphraser diverged on such maps in its first epoch)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from kd_cli.engine.artifacts import ModelSpec
from kd_cli.engine.device import autocast
from kd_cli.methods import METHODS, build_method, method_tasks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES, BATCH = 100, 8
OPTIM = yaml.safe_load((CONFIGS / "optim" / "sgd.yaml").read_text())


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    from kd_cli.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet56", CLASSES, 3, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=OPTIM["lr"], momentum=OPTIM["momentum"])
    for _ in range(6):
        images = torch.randint(0, 256, (BATCH, 3, 32, 32)).float() / 64 - 2
        loss = torch.nn.functional.cross_entropy(model(images), torch.randint(0, CLASSES, (BATCH,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def defaults(name: str) -> dict:
    config = yaml.safe_load((CONFIGS / "method" / f"{name}.yaml").read_text())
    if name == "ensemble":
        config["teachers"] = ["first", "second"]  # (the loader below hands out copies of the teacher)
    return config


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", [name for name in METHODS.names() if "classification" in method_tasks(name)])
def test_every_method_at_its_defaults_stays_finite_on_the_cifar_pair(teacher, name, precision):
    from kd_cli.models import create_model

    torch.manual_seed(0)
    student = create_model("resnet20", CLASSES, 3, 32)
    spec = ModelSpec("resnet56", {}, CLASSES, 3, 32, [0.5] * 3, [0.25] * 3, [str(i) for i in range(CLASSES)], "x")
    config = defaults(name)
    phased = int(config.get("init_epochs", 0)) > 0
    if phased:
        config["init_epochs"] = 1  # the phase, then the distillation: two epochs show both
    method = build_method(
        config,
        student,
        copy.deepcopy(teacher),
        num_samples=64,
        new_student=lambda: create_model("resnet20", CLASSES, 3, 32),
        load_model=lambda path: (copy.deepcopy(teacher), spec),
    )
    parameters = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        parameters, lr=OPTIM["lr"], momentum=OPTIM["momentum"], weight_decay=OPTIM["weight_decay"]
    )
    method.train()
    logged: list[set[str]] = []  # the terms of each epoch
    epochs = 2
    for epoch in range(epochs if phased else 1):
        method.start_epoch(epoch, epochs)
        for step in range(2):
            images = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(step))
            labels = torch.arange(BATCH) % CLASSES
            extra = (torch.arange(BATCH) + step * BATCH,) if method.needs_index else ()
            with autocast(torch.device("cpu"), precision):
                logits, terms = method(images, labels, *extra)
            values = {key: term.item() for key, term in terms.items()}
            assert terms and all(torch.isfinite(t) and t.dim() == 0 for t in terms.values()), (name, epoch, values)
            optimizer.zero_grad()
            sum(terms.values()).backward()
            optimizer.step()
        assert logits.shape == (BATCH, CLASSES)
        logged.append(set(terms))
    if phased:  # the phase trains its own term alone, the distillation then logs its terms
        assert len(logged[0]) == 1 and logged[1] and logged[0] != logged[1], logged


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", [name for name in METHODS.names() if "segmentation" in method_tasks(name)])
def test_every_segmentation_method_at_its_defaults_stays_finite_and_learns(name, precision):
    """The segmentation methods at their YAML defaults on the digit scenes' pair (segcnn -> segcnn_tiny,
    an untrained teacher), in fp32 and bf16: finite scalar terms, the logged terms each step, and a
    student that moves."""
    from kd_cli.models import create_model

    torch.manual_seed(0)
    student = create_model("segcnn_tiny", 11, 1, 32)
    teacher = create_model("segcnn", 11, 1, 32)
    method = build_method(defaults(name), student, teacher, task="segmentation")
    before = [p.detach().clone() for p in student.parameters()]
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=OPTIM["lr"])
    method.train()
    generator = torch.Generator().manual_seed(0)
    batch = 4 if name == "cirkd" else BATCH  # (CIRKD's pixel pairs grow with the batch squared)
    for _ in range(2):
        images = torch.randn(batch, 1, 32, 32, generator=generator)
        masks = torch.randint(0, 11, (batch, 32, 32), generator=generator)
        masks[:, :4] = 255  # a band of ignored pixels
        with autocast(torch.device("cpu"), precision):
            logits, terms = method(images, masks)
        assert terms and all(torch.isfinite(t) and t.dim() == 0 for t in terms.values()), terms
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    assert logits.shape == (batch, 11, 32, 32)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
