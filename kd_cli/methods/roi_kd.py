"""`method=roi_kd`: logit distillation of Faster R-CNN's ROI head, the teacher's head run on the student's
proposals (the classification distillation of Chen et al., "Learning Efficient Object Detection Models
with Knowledge Distillation", NeurIPS 2017, as Hinton's KD: T^2 KL(softmax(t/T) || softmax(s/T))).

In training, the student's ROI head samples its proposals (512 per image, a quarter positive: torchvision's
defaults) and classifies them; those very proposals, in image pixels, are pooled from the teacher's own FPN
levels (its backbone fed the student's backbone input, so the pixels are the same) by the teacher's ROI
pooler, box head and predictor. The term is KD on the class logits (background included) of every sampled
proposal: summed over the classes, averaged over the proposals, times T^2 and `kd_weight`. The detector's own
losses stay, each its own term; `pkd_weight` > 0 adds PKD on the paired FPN levels.

Shortcuts, named: the classification logits only (Chen et al. also bound the box regression by the teacher's
error; kd does not distil the box deltas); both detectors must be Faster R-CNN (torchvision's
`fasterrcnn_*`), whose ROI heads classify the same classes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.fpn_base import FpnDistiller, Levels, connectors, inner_detector
from kd_cli.methods.logit_utils import kd_loss
from kd_cli.methods.pkd import pkd_loss
from kd_cli.registry import NonNegative, Positive, Temperature
from kd_cli.tasks.detection import detector_terms


def roi_heads(model: nn.Module, role: str):
    detector = inner_detector(model, role)
    heads = getattr(detector, "roi_heads", None)
    if heads is None or not hasattr(heads, "box_predictor"):
        raise KdError(
            f"method=roi_kd runs the teacher's ROI head on the student's proposals, and the {role} is a "
            f"{type(detector).__name__}; pick Faster R-CNN detectors (fasterrcnn_resnet50_fpn, "
            "fasterrcnn_mobilenet_v3_large_fpn), or an FPN method (pkd, mgd) for other detectors"
        )
    return heads


@register_method("roi_kd")
class RoiKD(FpnDistiller):
    loss_weights = ("kd_weight", "pkd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        kd_weight: NonNegative,
        temperature: Temperature,
        pkd_weight: NonNegative,
        det_loss_scale: Positive,
    ):
        super().__init__(student, teacher, det_loss_scale=det_loss_scale)
        self.heads = [roi_heads(model, role) for model, role in ((student, "student"), (teacher, "teacher"))]
        classes = [heads.box_predictor.cls_score.out_features for heads in self.heads]
        if classes[0] != classes[1]:
            raise KdError(
                f"method=roi_kd compares the ROI heads' class logits, and the student's head has {classes[0]} "
                f"outputs, the teacher's {classes[1]}; build both for this data set's classes"
            )
        self.kd_weight, self.temperature, self.pkd_weight = kd_weight, temperature, pkd_weight
        self.pkd_connectors = connectors(self.student_channels, self.teacher_channels) if pkd_weight else None

    def forward(self, images: torch.Tensor, targets: Any):
        captured: dict[str, Any] = {}
        student = inner_detector(self.student, "student")
        handles = [
            student.backbone.register_forward_hook(lambda m, a, out: captured.update(input=a[0], levels=out)),
            self.heads[0].box_roi_pool.register_forward_pre_hook(
                lambda m, a: captured.update(proposals=a[1], image_shapes=a[2])
            ),
            self.heads[0].box_predictor.register_forward_hook(lambda m, a, out: captured.update(logits=out[0])),
        ]
        try:
            losses = self.student(images, targets)
        finally:
            for handle in handles:
                handle.remove()
        terms = {n: self.det_loss_scale * v for n, v in detector_terms(losses).items()}
        self.backbone_input_size = tuple(captured["input"].shape[-2:])
        teacher_levels = self.all_teacher_levels(captured["input"])
        if self.kd_weight:
            teacher_logits = self.teacher_roi_logits(teacher_levels, captured)
            terms["roi_kd"] = self.kd_weight * kd_loss(captured["logits"].float(), teacher_logits, self.temperature)
        student_levels = [captured["levels"][name] for name in self.level_names]
        paired = [teacher_levels[name] for name in self.teacher_level_names]
        terms.update(self.level_terms(student_levels, paired, targets))
        return None, terms

    @torch.no_grad()
    def teacher_roi_logits(self, levels: dict[str, torch.Tensor], captured: dict[str, Any]) -> torch.Tensor:
        """The teacher's class logits for the student's sampled proposals, pooled from its own levels."""
        heads = self.heads[1]
        pooled = heads.box_roi_pool(levels, captured["proposals"], captured["image_shapes"])
        return heads.box_predictor(heads.box_head(pooled))[0].float()

    def level_terms(self, student: Levels, teacher: Levels, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """PKD on the paired FPN levels, where `pkd_weight` asks for it."""
        if self.pkd_connectors is None:
            return {}
        pairs = zip(self.pkd_connectors, student, teacher)
        return {"pkd": self.pkd_weight * torch.stack([pkd_loss(c(s).float(), t.float()) for c, s, t in pairs]).sum()}
