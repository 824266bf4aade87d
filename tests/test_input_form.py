"""Teacher and student see the same image, each in its own form (size, normalisation, channels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from formats import digits_images, save_image
from kdrun import FAST, kd_here, summary

from kd_cli.models import create_model
from kd_cli.models.input_form import Form, ToOwnForm, feed_own_form

GREY = Form(1, 8, (0.3053,), (0.3759,))
RGB16 = Form(3, 16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_a_model_in_the_data_form_gets_no_hook():
    model = create_model("cnn", 10, 1, 8)
    assert feed_own_form(model, GREY, Form(1, 8, (0.3053,), (0.3759,))) is None
    assert not model._forward_pre_hooks
    # one value stands for every channel
    assert Form(3, 8, (0.5,), (0.2,)).same_as(Form(3, 8, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))


def test_conversion_is_denormalise_grey_to_rgb_resize_normalise():
    pixels = torch.rand(4, 1, 8, 8)
    data_batch = (pixels - 0.3053) / 0.3759
    converted = ToOwnForm(GREY, RGB16).convert(data_batch)
    rgb = F.interpolate(pixels.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(RGB16.mean).view(1, 3, 1, 1), torch.tensor(RGB16.std).view(1, 3, 1, 1)
    assert converted.shape == (4, 3, 16, 16)
    assert torch.allclose(converted, (rgb - mean) / std, atol=1e-5)


def test_only_normalisation_differs_the_teacher_sees_exactly_its_own_inputs():
    torch.manual_seed(0)
    teacher = create_model("cnn", 10, 3, 16).eval()
    pixels = torch.rand(5, 3, 16, 16)
    own = (pixels - torch.tensor(RGB16.mean).view(1, 3, 1, 1)) / torch.tensor(RGB16.std).view(1, 3, 1, 1)
    expected = teacher(own)
    data = Form(3, 16, (0.5,), (0.25,))
    feed_own_form(teacher, data, RGB16)
    assert torch.allclose(teacher((pixels - 0.5) / 0.25), expected, atol=1e-5)


def write_digit_folder(root: Path, count: int = 900) -> None:
    images, labels = digits_images(count, size=16)
    for i, (image, label) in enumerate(zip(images, labels)):
        save_image(root / str(label) / f"{i}.png", np.stack([image] * 3, axis=-1))


def test_distill_with_an_rgb_16px_teacher_on_grey_8px_data(tmp_path):
    """A teacher trained on 16 px RGB PNGs with ImageNet statistics teaches a student on scikit-learn's
    8 px grey digits with their own statistics, in one run."""
    folder = tmp_path / "pngs"
    write_digit_folder(folder)
    teacher = tmp_path / "teacher"
    trained = kd_here(
        "train-teacher",
        "dataset=imagefolder",
        f"dataset.root={folder}",
        "dataset.image_size=16",
        "dataset.val_fraction=0",
        "teacher=cnn",
        "augmentation=none",
        "trainer.epochs=8",
        "trainer.batch_size=32",
        *FAST,
        f"paths.outputs={tmp_path}",
        f"hydra.run.dir={teacher}",
        cwd=tmp_path,
    )
    assert trained.code == 0, trained.stderr
    spec = json.loads((teacher / "model.json").read_text())
    assert (spec["in_channels"], spec["input_size"]) == (3, 16)
    student = tmp_path / "student"
    result = kd_here(
        "distill",
        f"teacher.checkpoint={teacher}",
        "trainer.epochs=1",
        *FAST,
        f"paths.outputs={tmp_path}",
        f"hydra.run.dir={student}",
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr
    log = (student / "distill.log").read_text()
    assert "converted from the data's form (1x8x8" in log and "to its own (3x16x16" in log
    done = summary(student)
    # read through the conversion the teacher still knows the digits (chance is 10 %)
    assert done["status"] == "complete" and done["teacher_top1"] > 85  # 98 % on its own 16 px test split
    assert "warning" not in result.stderr


def test_a_converted_teacher_has_the_same_cache_identity_in_every_process():
    """The teacher cache's key hashes the teacher's pre-hooks by repr: an address in it would give every
    run its own key, and a sweep over a converted teacher would never share the cache."""
    from kd_cli.engine.teacher_cache import teacher_identity

    torch.manual_seed(0)
    first = create_model("cnn", 10, 3, 16)
    second = create_model("cnn", 10, 3, 16)
    second.load_state_dict(first.state_dict())
    feed_own_form(first, GREY, RGB16)
    feed_own_form(second, GREY, RGB16)
    assert "0x" not in repr(next(iter(first._forward_pre_hooks.values())))
    assert teacher_identity(first) == teacher_identity(second)
    other = create_model("cnn", 10, 3, 16)
    other.load_state_dict(first.state_dict())
    feed_own_form(other, Form(1, 8, (0.5,), (0.5,)), RGB16)  # another data form: another key
    assert teacher_identity(other) != teacher_identity(first)
