"""`method=crosskd`: cross-head knowledge distillation (Wang et al., "CrossKD: Cross-Head Knowledge
Distillation for Object Detection", CVPR 2024; the authors' code: jbwang1997/CrossKD, `CrossKDFCOS`).

The student's head features after its `reused_teacher_head_idx`-th tower conv (before the activation; the
FPN level itself for 0) are given each channel the teacher's mean and std there (`align_scale`: the
student's channel standardised over batch and pixels, then the teacher's statistics), activated, and run
through the rest of the teacher's head: its remaining tower convs and its predictors. Those cross-head
predictions are pulled to the teacher's own on every location of every level:
- classification: the authors' KD quality focal loss, BCE(cross logits, sigmoid(teacher logits)) times
  |sigmoid(cross) - sigmoid(teacher)|^beta, summed, over the avg factor, times `cls_weight` (0.4);
- boxes: both decoded at the student's locations, the IoU loss -log(IoU) weighted per location by the
  teacher's highest class probability, summed, over the avg factor, times `reg_weight` (0.75);
- avg factor: the sum of the centerness targets of the locations FCOS assigns to an object (the authors'
  `pos_centerness_denorm`), read from the student's own loss computation (its matched locations).
The student's own head is trained by the detector's losses only: the gradient of the KD terms reaches the
student through the teacher's frozen head, so the two objectives do not fight over one set of outputs.
`pkd_weight` > 0 adds PKD on the FPN levels (the authors' best configuration: CrossKD + PKD, weight 2).

Shortcuts, named: FCOS heads only (kd_fcos, kd_fcos_tiny, fcos_resnet50_fpn; RetinaNet's anchors need its
own assignment); student and teacher heads of other widths meet through a 1x1 conv per branch before
`align_scale` (the authors pair heads of equal width); boxes are decoded in pixels by torchvision's coder
(mmdetection's FCOS decodes its training-time predictions in stride units: the IoU differs where boxes are
small against the stride).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.fpn_base import FpnDistiller, Levels, connectors, inner_detector
from kd_cli.methods.pkd import pkd_loss
from kd_cli.registry import NonNegative, NonNegativeInt, Positive
from kd_cli.tasks.detection import detector_terms

EPS = 1e-6  # mmdetection's: the std guard of align_scale, the IoU's clamp and union guard
AVG_EPS = torch.finfo(torch.float32).eps  # mmdetection's weight_reduce_loss adds it to an avg factor


def align_scale(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) student maps with each channel standardised over N, H, W (unbiased std + 1e-6), then
    given the teacher's per-channel mean and std."""
    channels = student.shape[1]
    s = student.transpose(0, 1).reshape(channels, -1)
    t = teacher.transpose(0, 1).reshape(channels, -1)
    s = (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + EPS)
    s = s * t.std(1, keepdim=True) + t.mean(1, keepdim=True)
    return s.reshape(channels, student.shape[0], *student.shape[2:]).transpose(0, 1)


def quality_focal_kd(logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed over every element: BCE against the teacher's sigmoid, times the gap of the two sigmoids^beta."""
    target = teacher_logits.detach().sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * (logits.sigmoid() - target).abs().pow(beta)).sum()


def aligned_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU of each box with the box at the same place (x1 y1 x2 y2), the union kept >= 1e-6."""
    top_left = torch.maximum(boxes[..., :2], others[..., :2])
    bottom_right = torch.minimum(boxes[..., 2:], others[..., 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return overlap / (area(boxes) + area(others) - overlap).clamp(min=EPS)


def iou_kd(boxes: torch.Tensor, teacher_boxes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Summed -log(IoU) (IoU clamped at 1e-6), each location weighted."""
    return (-aligned_iou(boxes, teacher_boxes.detach()).clamp(min=EPS).log() * weights).sum()


def centerness_sum(targets: list[dict], matched: list[torch.Tensor], anchors: torch.Tensor, coder) -> torch.Tensor:
    """FCOS's centerness targets summed over the locations matched to an object (at least 1e-6)."""
    total = anchors.new_zeros(())
    for target, index, image_anchors in zip(targets, matched, anchors):
        foreground = index >= 0
        if not foreground.any():
            continue
        boxes = target["boxes"][index[foreground]]
        distances = coder.encode(image_anchors[foreground], boxes)  # (l, t, r, b) over the anchor size, as FCOS
        lr, tb = distances[:, [0, 2]], distances[:, [1, 3]]
        total = total + torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)).sum()
    return total.clamp(min=EPS)


def flat(maps: torch.Tensor, per_location: int) -> torch.Tensor:
    """(N, A*K, H, W) -> (N, H*W*A, K), torchvision's FCOS head layout."""
    n, _, h, w = maps.shape
    return maps.view(n, -1, per_location, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, per_location)


def tower_hold(tower: nn.Sequential, features: torch.Tensor, index: int) -> torch.Tensor:
    """The tower's output after its `index`-th conv and norm, before the activation (`features` for 0)."""
    return tower[: 3 * index - 1](features) if index else features


def tower_rest(tower: nn.Sequential, held: torch.Tensor, index: int) -> torch.Tensor:
    """The rest of a tower from a held feature: its activation, then the convs after the `index`-th."""
    return tower[3 * index :](F.relu(held) if index else held)


@register_method("crosskd")
class CrossKD(FpnDistiller):
    loss_weights = ("cls_weight", "reg_weight", "pkd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        reused_teacher_head_idx: NonNegativeInt,
        cls_weight: NonNegative,
        reg_weight: NonNegative,
        beta: Positive,
        pkd_weight: NonNegative,
        det_loss_scale: Positive,
    ):
        super().__init__(student, teacher, det_loss_scale=det_loss_scale)
        self.heads = [fcos_head(model, role) for model, role in ((student, "student"), (teacher, "teacher"))]
        self.index = reused_teacher_head_idx
        self.cls_weight, self.reg_weight, self.beta, self.pkd_weight = cls_weight, reg_weight, beta, pkd_weight
        self.check_pairing(student, teacher)
        joined = self.head_connector(), self.head_connector()  # both drawn, so a term's weight never moves the other's
        self.cls_connector = joined[0] if cls_weight else None  # (a parameter without a gradient: DDP refuses it)
        self.reg_connector = joined[1] if reg_weight else None
        self.pkd_connectors = connectors(self.student_channels, self.teacher_channels) if pkd_weight else None

    def head_connector(self) -> nn.Module:
        """Student head width -> teacher's: a 1x1 conv, the identity where they are equal."""
        student, teacher = (head.classification_head.cls_logits.in_channels for head in self.heads)
        return nn.Conv2d(student, teacher, 1) if student != teacher else nn.Identity()

    def check_pairing(self, student, teacher) -> None:
        """Every level of each paired with one of the other, the same anchors, and a tower deep enough."""
        convs = [len(head.classification_head.conv) // 3 for head in self.heads]
        if not 0 <= self.index <= min(convs):
            raise KdError(
                f"method.reused_teacher_head_idx={self.index}: the student's head has {convs[0]} tower conv(s) and the "
                f"teacher's {convs[1]}; give 0..{min(convs)} (0: the FPN level goes through the teacher's whole head)"
            )
        levels = len(self.level_names)
        if levels != len(inner_detector(student, "student").anchor_generator.sizes) or levels != len(
            inner_detector(teacher, "teacher").anchor_generator.sizes
        ):
            raise KdError(
                "method=crosskd compares the heads' predictions on every level, and the student's and the teacher's "
                "levels do not pair one to one; pick FCOS detectors of one family (kd_fcos_tiny with kd_fcos)"
            )
        sizes = [inner_detector(m, r).anchor_generator.sizes for m, r in ((student, "student"), (teacher, "teacher"))]
        if sizes[0] != sizes[1]:
            raise KdError(
                f"method=crosskd decodes both heads' boxes at the student's locations, and their anchor sizes differ "
                f"(student {sizes[0]}, teacher {sizes[1]}); pick FCOS detectors of one family"
            )

    def forward(self, images: torch.Tensor, targets: Any):
        captured: dict[str, Any] = {"cls": [], "reg": []}
        student = inner_detector(self.student, "student")
        with capture(student, self.index, captured):
            losses = self.student(images, targets)
        terms = {n: self.det_loss_scale * v for n, v in detector_terms(losses).items()}
        self.backbone_input_size = tuple(captured["input"].shape[-2:])
        teacher_levels = self.teacher_levels(captured["input"])
        terms.update(self.cross_head_terms(captured, teacher_levels))
        student_levels = [captured["levels"][name] for name in self.level_names]
        terms.update(self.level_terms(student_levels, teacher_levels, targets))
        return None, terms

    def level_terms(self, student: Levels, teacher: Levels, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """PKD on the FPN levels, where `pkd_weight` asks for it (the authors' CrossKD + PKD)."""
        if self.pkd_connectors is None:
            return {}
        pairs = zip(self.pkd_connectors, student, teacher)
        return {"pkd": self.pkd_weight * torch.stack([pkd_loss(c(s).float(), t.float()) for c, s, t in pairs]).sum()}

    def classes(self, held: torch.Tensor) -> torch.Tensor:
        """The teacher's classification branch from a held tower feature on: logits (N, HW, C)."""
        branch = self.heads[1].classification_head
        return flat(branch.cls_logits(tower_rest(branch.conv, held, self.index)), branch.num_classes)

    def distances(self, held: torch.Tensor) -> torch.Tensor:
        """The teacher's box branch from a held tower feature on: (l, t, r, b) over the anchor size (N, HW, 4)."""
        branch = self.heads[1].regression_head
        return flat(F.relu(branch.bbox_reg(tower_rest(branch.conv, held, self.index))), 4)

    def cross_head_terms(self, captured: dict[str, Any], teacher_levels: Levels) -> dict[str, torch.Tensor]:
        """The teacher's predictions, and the student's held features run through the teacher's head, compared
        (a term weighted 0 is not computed: its connector does not exist)."""
        head = self.heads[1]
        levels = [captured["levels"][name] for name in self.level_names]
        held = {"cls": levels, "reg": levels} if self.index == 0 else captured
        anchors = torch.stack(captured["anchors"])
        avg = centerness_sum(captured["targets"], captured["matched"], anchors, head.box_coder) + AVG_EPS
        terms: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            teacher_held = [
                (
                    tower_hold(head.classification_head.conv, level, self.index),
                    tower_hold(head.regression_head.conv, level, self.index),
                )
                for level in teacher_levels
            ]
            teacher_cls = torch.cat([self.classes(cls) for cls, _ in teacher_held], 1)
        if self.cls_connector is not None:
            crossed = [
                self.classes(align_scale(self.cls_connector(s).float(), t.float()))
                for s, (t, _) in zip(held["cls"], teacher_held)
            ]
            terms["crosskd_cls"] = (
                self.cls_weight * quality_focal_kd(torch.cat(crossed, 1), teacher_cls, self.beta) / avg
            )
        if self.reg_connector is not None:
            with torch.no_grad():
                teacher_boxes = head.box_coder.decode(
                    torch.cat([self.distances(r) for _, r in teacher_held], 1), anchors
                )
            crossed = [
                self.distances(align_scale(self.reg_connector(s).float(), t.float()))
                for s, (_, t) in zip(held["reg"], teacher_held)
            ]
            boxes = head.box_coder.decode(torch.cat(crossed, 1), anchors)
            weights = teacher_cls.max(-1).values.sigmoid()  # the teacher's confidence at each location
            terms["crosskd_reg"] = self.reg_weight * iou_kd(boxes, teacher_boxes, weights) / avg
        return terms


def fcos_head(model: nn.Module, role: str):
    from torchvision.models.detection.fcos import FCOSHead

    detector = inner_detector(model, role)
    head = getattr(detector, "head", None)
    if not isinstance(head, FCOSHead):
        raise KdError(
            f"method=crosskd runs the teacher's FCOS head on the student's head features, and the {role} is a "
            f"{type(detector).__name__}; pick FCOS detectors (kd_fcos, kd_fcos_tiny, fcos_resnet50_fpn), or an FPN "
            "method (pkd, mgd) for other detectors"
        )
    return head


class capture:
    """While the student runs its training pass: its backbone's input and levels, its head towers' held
    features per level, and what its loss computation matched (targets, anchors, matched locations)."""

    def __init__(self, detector: nn.Module, index: int, captured: dict[str, Any]):
        self.detector, self.index, self.captured = detector, index, captured
        self.handles: list[Any] = []

    def __enter__(self):
        detector, captured = self.detector, self.captured

        def keep_levels(module, args, output):
            captured["input"], captured["levels"] = args[0], output

        self.handles.append(detector.backbone.register_forward_hook(keep_levels))
        if self.index:
            for branch, key in ((detector.head.classification_head, "cls"), (detector.head.regression_head, "reg")):
                norm = branch.conv[3 * self.index - 2]
                self.handles.append(norm.register_forward_hook(lambda m, a, out, key=key: captured[key].append(out)))
        original = detector.head.compute_loss
        self.own = detector.head.__dict__.get("compute_loss")  # an instance's own (a test's spy), put back on exit

        def compute_loss(targets, head_outputs, anchors, matched_idxs):
            captured.update(targets=targets, head_outputs=head_outputs, anchors=anchors, matched=matched_idxs)
            return original(targets, head_outputs, anchors, matched_idxs)

        detector.head.compute_loss = compute_loss  # an instance attribute, removed on exit
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        del self.detector.head.compute_loss
        if self.own is not None:
            self.detector.head.compute_loss = self.own
        return False
