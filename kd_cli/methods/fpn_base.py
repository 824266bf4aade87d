"""Base of the detection methods on FPN levels (PKD, MGD, FPN imitation, ...): the same image for both
models, the levels of each, the detector's own losses.

Teacher and student see the same image: torchvision's detectors resize and pad inside `forward`, so a method
that compared their features on images each model prepared itself could compare different pixels. Here the
student's backbone input (after its transform) is captured by a hook and given to the teacher's backbone as it
is; before the first step the two transforms are compared (size, padding, normalisation), and each student
level of a dry run is paired with the teacher level of its size (its stride): all of them for a pair of one
family, the common strides for Faster R-CNN ResNet-50-FPN -> MobileNetV3-FPN; no common level is one line
showing both. The detector's own losses stay, each its own term (`det_classification`, ...), scaled by
`det_loss_scale` (> 0: the head learns from them alone); the method adds its terms per level (summed over
levels, as the authors' configs do with one loss per FPN level of equal weight).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections import OrderedDict
from typing import Any, cast

import torch
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods.base import Distiller
from kd_cli.tasks.detection import detector_terms

log = logging.getLogger("kd")

Levels = list[torch.Tensor]


def inner_detector(model: nn.Module, role: str) -> Any:
    """The torchvision detector inside kd's `Detector` wrapper (models/detection.py)."""
    detector = getattr(model, "detector", None)
    if detector is None or not hasattr(detector, "backbone") or not hasattr(detector, "transform"):
        raise KdError(
            f"the {role} {type(model).__name__} is not one of kd's detectors (a torchvision detector with a "
            "backbone and a transform); pick a detection model (kd_fcos, fasterrcnn_resnet50_fpn, ...)"
        )
    return detector


def transform_settings(detector: Any) -> dict[str, Any]:
    t = detector.transform
    return {
        "min_size": tuple(t.min_size),
        "max_size": t.max_size,
        "size_divisible": t.size_divisible,
        "fixed_size": t.fixed_size,
        "image_mean": sorted(set(t.image_mean)),
        "image_std": sorted(set(t.image_std)),
    }


def check_same_input(student: nn.Module, teacher: nn.Module) -> None:
    """Both detectors prepare an image alike (no resize of their own, the same padding), so the student's
    backbone input is the teacher's too; and the teacher takes the run's batches as they are (a teacher
    trained on images normalised otherwise is given converted batches by a pre-hook on the whole model,
    which its backbone, fed directly here, would never see)."""
    from kd_cli.models.input_form import ToOwnForm

    converted = [h for h in teacher._forward_pre_hooks.values() if isinstance(h, ToOwnForm)]
    if converted:
        raise KdError(
            f"the teacher was trained on images of another form ({converted[0]!r}); the FPN methods feed its "
            "backbone the student's batch as it is: train the teacher with this run's dataset.mean, dataset.std "
            "and image size"
        )
    s, t = (transform_settings(inner_detector(m, role)) for m, role in ((student, "student"), (teacher, "teacher")))
    keys = [key for key in s if s[key] != t[key]]
    if keys:
        fix = (
            "build both for the same data set (same input size)"
            if {"min_size", "max_size"} & set(keys)
            else "pair detectors of one family that pad alike (kd_fcos with kd_fcos_tiny; torchvision's "
            "Faster R-CNN, RetinaNet and FCOS with each other)"
        )
        raise KdError(
            "the student and the teacher prepare images differently (student vs teacher: "
            f"{'; '.join(f'{key} {s[key]} vs {t[key]}' for key in keys)}), so their features would come from "
            f"different pixels; {fix}"
        )


def level_shapes(model: nn.Module) -> OrderedDict[str, tuple[int, ...]]:
    """(C, H, W) of each FPN level for one image of the model's input shape (a dry run in eval mode)."""
    detector = inner_detector(model, "model")
    channels, height, width = cast(tuple[int, int, int], model.kd_input_shape)
    channels *= getattr(model, "repeat", 1)
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng():  # (the dry run draws nothing of the run's streams)
        batch, _ = detector.transform([torch.zeros(channels, height, width)])
        levels = detector.backbone(batch.tensors)
    model.train(was_training)
    return OrderedDict((name, tuple(level.shape[1:])) for name, level in levels.items())


def level_pairs(student: OrderedDict, teacher: OrderedDict) -> list[tuple[str, str]]:
    """Each student level with the teacher level of the same height and width (the same stride), shallow
    to deep: kd_fcos's levels pair one to one; Faster R-CNN MobileNetV3-FPN's (strides 16, 32, pool) pair
    with ResNet-50-FPN's of those strides."""
    pairs, taken = [], set()
    for name, (_, height, width) in student.items():
        partner = next((t for t, shape in teacher.items() if shape[1:] == (height, width) and t not in taken), None)
        if partner is not None:
            pairs.append((name, partner))
            taken.add(partner)
    return pairs


class FpnDistiller(Distiller):
    """A detection method comparing the FPN levels of student and teacher. A subclass writes
    `level_terms(student_levels, teacher_levels, targets)` and declares its options, passing
    `det_loss_scale` on."""

    tasks = ("detection",)

    def __init__(self, student: nn.Module, teacher: nn.Module, *, det_loss_scale: float):
        super().__init__(student, teacher)
        check_same_input(student, teacher)
        self.det_loss_scale = det_loss_scale
        student_shapes, teacher_shapes = level_shapes(student), level_shapes(teacher)
        pairs = level_pairs(student_shapes, teacher_shapes)
        if not pairs:
            show = "; ".join(
                f"{role} " + ", ".join(f"{n} {h}x{w}" for n, (_, h, w) in shapes.items())
                for role, shapes in (("student", student_shapes), ("teacher", teacher_shapes))
            )
            raise KdError(
                f"method={self.method_name} compares FPN levels of equal size, and no level of the student has a "
                f"teacher level of its size ({show}); pick a student and a teacher with common strides (e.g. "
                "kd_fcos_tiny with kd_fcos)"
            )
        if len(pairs) < len(student_shapes) or len(pairs) < len(teacher_shapes):
            log.info(
                f"{self.method_name}: distils the FPN levels of equal size (student <- teacher: "
                + ", ".join(f"{s} <- {t}" for s, t in pairs)
                + "); the others have no partner"
            )
        self.level_names = [s for s, _ in pairs]
        self.teacher_level_names = [t for _, t in pairs]
        self.student_channels = [student_shapes[s][0] for s, _ in pairs]
        self.teacher_channels = [teacher_shapes[t][0] for _, t in pairs]

    def forward(self, images: torch.Tensor, targets: Any):
        captured: dict[str, Any] = {}

        def keep(module, args, output):
            captured["input"], captured["levels"] = args[0], output

        hook = inner_detector(self.student, "student").backbone.register_forward_hook(keep)
        try:
            losses = self.student(images, targets)
        finally:
            hook.remove()
        terms = {n: self.det_loss_scale * v for n, v in detector_terms(losses).items()}
        self.backbone_input_size = tuple(captured["input"].shape[-2:])  # (H, W) the levels cover (FGD's boxes)
        teacher_levels = self.teacher_levels(captured["input"])
        student_levels = [captured["levels"][name] for name in self.level_names]
        terms.update(self.level_terms(student_levels, teacher_levels, targets))
        return None, terms

    @torch.no_grad()
    def teacher_levels(self, backbone_input: torch.Tensor) -> Levels:
        """The teacher's levels paired with the student's, in the student's order."""
        levels = self.all_teacher_levels(backbone_input)
        return [levels[name] for name in self.teacher_level_names]

    @torch.no_grad()
    def all_teacher_levels(self, backbone_input: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every level of the teacher's backbone on the student's backbone input."""
        assert self.teacher is not None
        repeat = getattr(self.teacher, "repeat", 1) // getattr(self.student, "repeat", 1)
        if repeat > 1:  # a grey image the student takes as is, the teacher as RGB
            backbone_input = backbone_input.repeat(1, repeat, 1, 1)
        levels = inner_detector(self.teacher, "teacher").backbone(backbone_input)
        return {name: level.detach() for name, level in levels.items()}

    @abstractmethod
    def level_terms(self, student: Levels, teacher: Levels, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The method's own terms from the levels of both models (shallow to deep) and the batch's targets."""


def connectors(student_channels: list[int], teacher_channels: list[int], always: bool = False) -> nn.ModuleList:
    """A 1x1 conv per level from the student's channels to the teacher's (identity where they are equal,
    unless `always`)."""
    return nn.ModuleList(
        nn.Conv2d(s, t, 1) if always or s != t else nn.Identity() for s, t in zip(student_channels, teacher_channels)
    )
