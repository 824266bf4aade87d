"""`method=mlkd`: Jin, Wang & Lin, "Multi-Level Logit Distillation" (CVPR 2023).

The teacher's and the student's logits are softened at several temperatures, P = softmax(z / T), and
aligned at three levels, each summed over T in `temperatures`:

    instance  T^2 * sum_k P_t[i,k] log(P_t[i,k] / P_s[i,k])  per sample i, averaged over the batch
    batch     sum_ij (G_t - G_s)_ij^2 / B    G = P P^T    (B x B: how alike two samples' predictions are)
    class     sum_ab (M_t - M_s)_ab^2 / C    M = P^T P    (C x C: how two classes co-occur in the batch)

as the authors' `kd_loss`, `bc_loss` and `cc_loss` (mdistiller/distillers/KD_ours.py in
Jin-Ying/Multi-Level-Logit-Distillation): T^2 on the instance level only. Their confidence masking is
read from the teacher's weak-view softmax (T = 1): a sample is kept when its top probability is at most
the batch's `mask_percentile` percentile of them (linear interpolation, as np.percentile; 50: the
median), a class when its probability summed over the batch is at most that percentile of the classes'.
`masking=reference` does what their released code computes: each masked term of the weak view times the
fraction kept (the mask multiplies a loss already averaged, so only its mean reaches the loss);
`per_sample` sums the kept samples' rows (instance, batch) or the kept classes' columns (class) with the
same normalisers; `none` keeps everything.

The authors train on two views of each image and return

    ce_weight * (CE(weak) + CE(strong)) + kd_weight * (masked instance(weak) + instance(strong))
    + batch_weight * masked batch(weak) + class_weight * masked class(weak)

(their batch and class terms of the strong view are computed but never added to the loss). kd's loader
gives one augmented batch, the weak view; the strong view is made here from that batch by `strong_view`
(RandAugment-like, see there), and the teacher runs on it: the teacher cache serves the weak view only,
since it stores the outputs for the batch the loader gave.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.methods.feature_utils import check_relation_batch, full_precision, tensor_sum
from kd_cli.registry import NonNegative, Positive, PositiveInt, Range

Percentile = Annotated[float, Range(0, 100)]
Masking = Literal["reference", "per_sample", "none"]

# The authors' RandAugment list (mdistiller/dataset/cifar100.py, FixMatch's), each op's magnitude drawn
# uniformly from its range: factors of PIL's ImageEnhance, posterize bits, degrees, shear, the solarize
# threshold on 0..256, translation as a fraction of the side.
STRONG_OPS: dict[str, tuple[float, float]] = {
    "autocontrast": (0, 1),
    "brightness": (0.05, 0.95),
    "color": (0.05, 0.95),
    "contrast": (0.05, 0.95),
    "equalize": (0, 1),
    "identity": (0, 1),
    "posterize": (4, 8),
    "rotate": (-30, 30),
    "sharpness": (0.05, 0.95),
    "shear_x": (-0.3, 0.3),
    "shear_y": (-0.3, 0.3),
    "solarize": (0, 256),
    "translate_x": (-0.3, 0.3),
    "translate_y": (-0.3, 0.3),
}
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
COLOUR = ("autocontrast", "brightness", "color", "contrast", "equalize", "posterize", "sharpness", "solarize")
CUTOUT_MAX = 0.5  # the side of the cutout square, a fraction of the width, uniform in [0, 0.5)
CUTOUT_GREY = (125 / 255, 123 / 255, 114 / 255)  # the authors' fill colour
LUMA = (0.299, 0.587, 0.114)  # PIL's convert("L"), which Color and Contrast blend towards


# ---------------------------------------------------------------- the three levels (pure functions)


def softened(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return (full_precision(logits) / temperature).softmax(dim=1)


def instance_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,): T^2 * KL(P_t || P_s) of each sample."""
    log_s = (full_precision(student_logits) / temperature).log_softmax(dim=1)
    log_t = (full_precision(teacher_logits) / temperature).log_softmax(dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1) * temperature**2


def batch_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,): row i of sum_j (G_t - G_s)_ij^2 / B; their sum is the authors' `bc_loss`."""
    p_s, p_t = softened(student_logits, temperature), softened(teacher_logits, temperature)
    return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum(dim=1) / len(p_s)


def class_columns(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(C,): column b of sum_a (M_t - M_s)_ab^2 / C; their sum is the authors' `cc_loss`."""
    p_s, p_t = softened(student_logits, temperature), softened(teacher_logits, temperature)
    return ((p_t.T @ p_t - p_s.T @ p_s) ** 2).sum(dim=0) / p_s.shape[1]


def confidence_masks(teacher_logits: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples kept (B,), classes kept (C,)): at most the `percentile` percentile of the batch's teacher
    confidences (a sample's top probability; a class's probability summed over the batch), at T = 1."""
    with torch.no_grad():
        p = full_precision(teacher_logits).softmax(dim=1)
        confidence, class_confidence = p.max(dim=1).values, p.sum(dim=0)
        q = percentile / 100
        return confidence <= torch.quantile(confidence, q), class_confidence <= torch.quantile(class_confidence, q)


def masked(values: torch.Tensor, keep: torch.Tensor, masking: str, mean: bool) -> torch.Tensor:
    """Reduce per-sample (or per-class) contributions: their mean (`mean`) or sum, masked as `masking` says."""
    normaliser = len(values) if mean else 1
    if masking == "reference":  # the authors' scalar loss times mask.mean()
        return values.sum() / normaliser * keep.to(values.dtype).mean()
    if masking == "per_sample":
        return (values * keep.to(values.dtype)).sum() / normaliser
    return values.sum() / normaliser


def mlkd_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperatures: Sequence[float],
    masking: str = "reference",
    percentile: float = 50.0,
    levels: Sequence[str] = ("instance", "batch", "class"),
) -> dict[str, torch.Tensor]:
    """The unweighted `levels`, each summed over `temperatures`, masked by the teacher's confidence."""
    keep_samples, keep_classes = confidence_masks(teacher_logits, percentile)
    reducers = {
        "instance": (instance_rows, keep_samples, True),
        "batch": (batch_rows, keep_samples, False),
        "class": (class_columns, keep_classes, False),
    }
    losses = {}
    for level in levels:
        rows, keep, mean = reducers[level]
        losses[level] = tensor_sum(
            masked(rows(student_logits, teacher_logits, t), keep, masking, mean) for t in temperatures
        )
    return losses


# ---------------------------------------------------------------- the strong view


def strong_view(
    images: torch.Tensor,
    *,
    ops: int = 2,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A RandAugment-like strong view of a normalised (B, C, H, W) batch, drawn per sample: `ops` ops picked
    uniformly (with replacement) from the authors' 14, each at a uniform magnitude in its range, then a cutout
    square of side uniform in [0, W/2). The draws come from `generator` (None: the device's default
    generator, which the loop seeds and checkpoints), the same number of them whatever the images hold.

    Geometric ops (rotate, shear, translate: nearest-neighbour, as PIL's defaults) commute with the per-channel
    normalisation, so they act on the batch as it is; with `mean`/`std` (the data set's) the batch is taken
    back to [0, 1] pixels, the colour ops act as PIL's do, and uncovered corners are black and the cutout the
    authors' grey, as theirs. Without them the colour ops do nothing (they are still drawn, so the geometric
    ops keep their odds), and corners and the cutout take the value 0: the data set's mean colour."""
    b, c = images.shape[:2]
    device = images.device
    with torch.autocast(device.type, enabled=False):
        x = images.float()
        stats = None
        if mean is not None and std is not None:
            stats = tuple(torch.as_tensor(list(v), dtype=x.dtype, device=device).view(1, -1, 1, 1) for v in (mean, std))
            x = (x * stats[1] + stats[0]).clamp(0, 1)
        names = list(STRONG_OPS)
        for _ in range(ops):
            choice = torch.randint(len(names), (b,), generator=generator, device=device)
            level = torch.rand(b, generator=generator, device=device)
            x = _apply_ops(x, choice, level, names, colour=stats is not None)
        fill = 0.0 if stats is None else _grey(c, x)
        x = _cutout(x, torch.rand(3, b, generator=generator, device=device), fill)
        if stats is not None:
            x = (x - stats[0]) / stats[1]
    x = x.to(images.dtype)
    if images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _magnitude(name: str, level: torch.Tensor) -> torch.Tensor:
    low, high = STRONG_OPS[name]
    return low + (high - low) * level


def _apply_ops(
    x: torch.Tensor, choice: torch.Tensor, level: torch.Tensor, names: list[str], colour: bool
) -> torch.Tensor:
    """One op per sample (`choice` indexes `names`): every op runs on the whole batch and each sample takes
    its own op's result (a fixed amount of work and no host sync, whatever was drawn)."""

    def picked(name: str) -> torch.Tensor:
        return (choice == names.index(name)).view(-1, 1, 1, 1)

    x = torch.where(torch.stack([picked(n) for n in GEOMETRIC]).any(0), _geometric(x, choice, level, names), x)
    if colour:
        for name in COLOUR:
            x = torch.where(picked(name), _colour(name, x, _magnitude(name, level).view(-1, 1, 1, 1)), x)
    return x


def _geometric(x: torch.Tensor, choice: torch.Tensor, level: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Each sample's rotate / shear / translate (identity for the others), as PIL's `rotate` (about the
    centre) and `transform(AFFINE)` (about the top-left corner) map output pixels to input pixels."""
    b, _, h, w = x.shape
    one, zero = torch.ones_like(level), torch.zeros_like(level)
    matrix = torch.stack([torch.stack([one, zero], 1), torch.stack([zero, one], 1)], 1)  # (B, 2, 2) pixels
    offset = torch.zeros(b, 2, dtype=level.dtype, device=level.device)
    centre = torch.tensor([w / 2, h / 2], dtype=level.dtype, device=level.device)
    size = torch.tensor([w, h], dtype=level.dtype, device=level.device)
    for axis, name in enumerate(("shear_x", "shear_y")):
        on = (choice == names.index(name)).to(level.dtype)
        matrix[:, axis, 1 - axis] += on * _magnitude(name, level)
    for axis, name in enumerate(("translate_x", "translate_y")):
        on = (choice == names.index(name)).to(level.dtype)
        offset[:, axis] += on * _magnitude(name, level) * size[axis]
    rotate = choice == names.index("rotate")
    angle = torch.where(rotate, torch.deg2rad(_magnitude("rotate", level)), zero)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    matrix = torch.where(rotate.view(-1, 1, 1), rotation, matrix)
    offset = torch.where(rotate.view(-1, 1), centre - rotation @ centre, offset)
    # pixel p = S (X + 1) with S = diag(W/2, H/2) for affine_grid's X in [-1, 1] (align_corners=False)
    scale = centre
    linear = matrix * scale.view(1, 1, 2) / scale.view(1, 2, 1)
    shift = (matrix @ scale + offset) / scale - 1
    theta = torch.cat([linear, shift.unsqueeze(2)], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _colour(name: str, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL's op on [0, 1] pixels, with a per-sample magnitude `v` (B, 1, 1, 1)."""
    if name == "autocontrast":
        low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        flat = high <= low
        return torch.where(flat, x, (x - low) / torch.where(flat, torch.ones_like(high), high - low))
    if name == "equalize":
        from torchvision.transforms.v2.functional import equalize

        return equalize(x)  # per image and channel, on 256 bins, PIL's lookup table
    if name == "brightness":  # blend with black
        return (x * v).clamp(0, 1)
    if name == "color":  # blend with the grey image
        grey = _luma(x)
        return (grey + v * (x - grey)).clamp(0, 1)
    if name == "contrast":  # blend with the grey image's mean
        grey = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
        return (grey + v * (x - grey)).clamp(0, 1)
    if name == "sharpness":  # blend with PIL's SMOOTH filter, border pixels unfiltered
        kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13
        c = x.shape[1]
        smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), padding=1, groups=c)
        border = torch.ones_like(x[:1, :1], dtype=torch.bool)
        border[..., 1:-1, 1:-1] = False
        smooth = torch.where(border, x, smooth)
        return (smooth + v * (x - smooth)).clamp(0, 1)
    if name == "posterize":  # keep the top int(v) bits of the 8-bit value
        drop = 2 ** (8 - v.floor())
        value = (x * 255).round()
        return (value - torch.remainder(value, drop)) / 255
    if name == "solarize":  # invert the values at or above the threshold (0..256 on 8-bit values)
        return torch.where(x * 255 >= v, 1 - x, x)
    raise ValueError(name)


def _grey(channels: int, x: torch.Tensor) -> torch.Tensor:
    grey = CUTOUT_GREY if channels == 3 else (sum(CUTOUT_GREY) / 3,) * channels
    return torch.tensor(grey, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


def _cutout(x: torch.Tensor, draws: torch.Tensor, fill: float | torch.Tensor) -> torch.Tensor:
    """The authors' Cutout: a square of side s = u * W/2 around a uniform point, its corner clipped at 0."""
    _, _, h, w = x.shape
    side = draws[0] * CUTOUT_MAX * w
    left = (draws[1] * w - side / 2).clamp(min=0).floor()
    top = (draws[2] * h - side / 2).clamp(min=0).floor()
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + side).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + side).view(-1, 1, 1))
    )
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    return torch.where(inside.unsqueeze(1), fill.expand_as(x) if fill.dim() else fill, x)


# ---------------------------------------------------------------- the method


@register_method("mlkd")
class MultiLevelKD(Distiller):
    # The weak view's teacher logits may come from the cache (they are the loader's batch); the strong view
    # is made in `forward`, so its teacher outputs are always computed (`strong_teacher_logits`).
    reads_teacher_logits_only = True
    loss_weights = ("ce_weight", "kd_weight", "batch_weight", "class_weight")

    @classmethod
    def validate_options(cls, **options: Any) -> None:
        # Taken from **options (the registry passes every option) so the signature stays the base's.
        temperatures: list[float] = options.pop("temperatures")
        mean: list[float] | None = options.pop("mean", None)
        std: list[float] | None = options.pop("std", None)
        super().validate_options(**options)
        if not temperatures:
            raise KdError(
                "method.temperatures is empty; give at least one temperature (the authors use [2, 3, 4, 5, 6])"
            )
        if (mean is None) != (std is None):
            raise KdError(
                "method.mean and method.std go together: give both (the data set's, e.g. "
                "method.mean='${dataset.mean}' method.std='${dataset.std}') or neither"
            )
        if mean is not None and std is not None and len(mean) != len(std):
            raise KdError(f"method.mean has {len(mean)} value(s) but method.std has {len(std)}; give as many of each")

    def __init__(
        self,
        student,
        teacher,
        *,
        ce_weight: NonNegative,
        kd_weight: NonNegative,
        batch_weight: NonNegative,
        class_weight: NonNegative,
        temperatures: list[Positive],
        masking: Masking,
        mask_percentile: Percentile,
        strong_view: bool,
        strong_ops: PositiveInt,
        mean: list[float] | None,
        std: list[Positive] | None,
    ):
        super().__init__(student, teacher)
        channels = getattr(student, "kd_input_shape", (None,))[0]
        if mean is not None and channels is not None and len(mean) not in (1, channels):
            raise KdError(
                f"method.mean/std have {len(mean)} value(s) but the images have {channels} channel(s); "
                f"give {channels} values each (the data set's: method.mean='${{dataset.mean}}' "
                "method.std='${dataset.std}') or null"
            )
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self.batch_weight, self.class_weight = batch_weight, class_weight
        self.temperatures = [float(t) for t in temperatures]
        self.masking, self.mask_percentile = masking, mask_percentile
        self.two_views, self.strong_ops = strong_view, strong_ops
        self.mean, self.std = mean, std

    def weak_levels(self) -> list[str]:
        weights = {"instance": self.kd_weight, "batch": self.batch_weight, "class": self.class_weight}
        return [level for level, weight in weights.items() if weight]

    @torch.no_grad()
    def strong_teacher_logits(self, strong: torch.Tensor) -> torch.Tensor:
        """Never from the cache: it holds the teacher's outputs for the loader's batch, not for this view."""
        assert self.teacher is not None  # mlkd requires a teacher
        return self.teacher(strong)

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        if self.batch_weight:
            check_relation_batch("mlkd", len(images))  # before any work, whatever the models make of one sample
        logits = self.student(images)
        terms: dict[str, torch.Tensor] = {}
        levels = self.weak_levels()
        strong = None
        if self.two_views and (self.ce_weight or self.kd_weight):
            strong = strong_view(images, ops=self.strong_ops, mean=self.mean, std=self.std)
            strong_logits = self.student(strong)
        if self.ce_weight:
            ce = F.cross_entropy(logits, labels)
            if strong is not None:
                ce = ce + F.cross_entropy(strong_logits, labels)
            terms["ce"] = self.ce_weight * ce
        if levels:
            weak = mlkd_losses(
                logits, self.teacher_logits(images), self.temperatures, self.masking, self.mask_percentile, levels
            )
            if self.kd_weight:
                terms["kd"] = self.kd_weight * weak["instance"]
                if strong is not None:
                    strong_teacher = self.strong_teacher_logits(strong)
                    terms["kd_strong"] = (
                        self.kd_weight
                        * mlkd_losses(strong_logits, strong_teacher, self.temperatures, "none", levels=("instance",))[
                            "instance"
                        ]
                    )
            if self.batch_weight:
                terms["batch"] = self.batch_weight * weak["batch"]
            if self.class_weight:
                terms["class"] = self.class_weight * weak["class"]
        return logits, terms
