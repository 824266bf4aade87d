"""`method=head_kd`: logit distillation of a dense detection head (RetinaNet, FCOS): at every location of
every level, the student's class logits are pulled to the teacher's (its head run on its own FPN levels, fed
the student's backbone input).

The term is the KD quality focal loss of CrossKD's authors (a sigmoid head's KD: BCE against the teacher's
sigmoid, times |sigmoid(student) - sigmoid(teacher)|^beta, so confident agreement costs nothing), summed over
locations and classes, over the number of locations the detector's own loss assigns to an object (what
torchvision normalises its own focal loss by), times `kd_weight`. This is the "prediction mimicking" that
CrossKD compares itself with: the student's own head serves both its detection loss and the teacher's
targets (`method=crosskd` separates the two).

Student and teacher must predict at the same locations: levels of equal strides paired one to one and the
same anchors per location (sizes and aspect ratios), said in one line otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.crosskd import capture, quality_focal_kd
from kd_cli.methods.fpn_base import FpnDistiller, Levels, inner_detector
from kd_cli.registry import NonNegative, Positive
from kd_cli.tasks.detection import detector_terms


def dense_head(model: nn.Module, role: str):
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.models.detection.retinanet import RetinaNetHead

    detector = inner_detector(model, role)
    head = getattr(detector, "head", None)
    if not isinstance(head, FCOSHead | RetinaNetHead):
        raise KdError(
            f"method=head_kd distils a dense head's class logits, and the {role} is a {type(detector).__name__}; "
            "pick RetinaNet or FCOS detectors (retinanet_resnet50_fpn, fcos_resnet50_fpn, kd_fcos), roi_kd for "
            "Faster R-CNN, or an FPN method (pkd, mgd)"
        )
    return head


@register_method("head_kd")
class HeadKD(FpnDistiller):
    loss_weights = ("kd_weight",)

    def __init__(self, student, teacher, *, kd_weight: NonNegative, beta: Positive, det_loss_scale: Positive):
        super().__init__(student, teacher, det_loss_scale=det_loss_scale)
        self.heads = [dense_head(model, role) for model, role in ((student, "student"), (teacher, "teacher"))]
        if type(self.heads[0]) is not type(self.heads[1]):
            raise KdError(
                f"method=head_kd compares the heads' logits location by location, and the student's head is a "
                f"{type(self.heads[0]).__name__}, the teacher's a {type(self.heads[1]).__name__}; pick one family"
            )
        self.check_locations(student, teacher)
        self.kd_weight, self.beta = kd_weight, beta

    def check_locations(self, student, teacher) -> None:
        generators = [inner_detector(m, r).anchor_generator for m, r in ((student, "student"), (teacher, "teacher"))]
        anchors = [(g.sizes, g.aspect_ratios) for g in generators]
        levels = len(self.level_names)
        if levels != len(generators[0].sizes) or levels != len(generators[1].sizes) or anchors[0] != anchors[1]:
            raise KdError(
                "method=head_kd compares the heads' logits at each location, and the student's and the teacher's "
                f"levels or anchors differ (student {anchors[0][0]}, teacher {anchors[1][0]}); pick detectors of "
                "one family with the same anchors"
            )

    def forward(self, images: torch.Tensor, targets: Any):
        captured: dict[str, Any] = {}
        with capture(inner_detector(self.student, "student"), 0, captured):
            losses = self.student(images, targets)
        terms = {n: self.det_loss_scale * v for n, v in detector_terms(losses).items()}
        self.backbone_input_size = tuple(captured["input"].shape[-2:])
        terms.update(self.head_terms(captured, self.teacher_levels(captured["input"])))
        return None, terms

    def level_terms(self, student: Levels, teacher: Levels, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """No term on the levels themselves: head_kd distils what the head makes of them (`head_terms`)."""
        return {}

    def head_terms(self, captured: dict[str, Any], teacher: Levels) -> dict[str, torch.Tensor]:
        """KD on the class logits at every location; `captured`: what the student's loss computation saw."""
        with torch.no_grad():
            teacher_logits = self.heads[1](teacher)["cls_logits"].float()
        student_logits = captured["head_outputs"]["cls_logits"].float()
        foreground = sum(int((index >= 0).sum()) for index in captured["matched"])
        loss = quality_focal_kd(student_logits, teacher_logits, self.beta) / max(1, foreground)
        return {"head_kd": self.kd_weight * loss}
