"""`method=kdsvd`: Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value
Decomposition" (ECCV 2018), in the form of the public PyTorch port (Knowledge-Distillation-Zoo's kdsvd.py;
mdistiller's KDSVD is the same code).

Per sample, each tapped map is reshaped to X (H*W, C) and decomposed, X = U S V^T. The teacher keeps its
top k right singular vectors v_j and its top k singular values scaled to unit L2 norm, s_j. The student
keeps its top k+3 vectors; for each teacher vector it offers the one of largest |cosine| with it, its sign
flipped to agree. Both sides are scaled by the teacher's s_j (a_j = s_j v_j), and consecutive tapped layers
l-1, l are related entry by entry through an RBF:

    G_l[m, n, j] = exp(-(a_l[m, j] - a_{l-1}[n, j])^2 / 8)        m over C_l, n over C_{l-1}

    loss = sum over l >= 1 of  (1/B) sum_{b, m, n, j} (G^student_l - G^teacher_l)^2

with the teacher's G held constant. The cosine compares channels one to one: where the two models' channel
counts differ, the student's map first goes through a 1x1 conv + BN onto the teacher's channels (what
KD-Zoo's README advises for unequal shapes; not part of the reference, which assumes equal ones).

Beyond the reference, for determinism and finite gradients:
- the teacher's singular vectors get a fixed sign (the entry of largest magnitude positive, as
  scikit-learn's svd_flip): the reference keeps whatever sign LAPACK/cuSOLVER returns, and G depends on
  it, so its loss differs between libraries and devices;
- the student's singular vectors are differentiated by `_TopRightSingularVectors`, the exact gradient of
  the vectors used with the authors' guard (their TensorFlow code's custom SVD gradient zeroes the
  1/(s_i^2 - s_j^2) factors that are not finite): factors of singular values equal within the numerical
  rank tolerance (max(H*W, C) * eps * s_max^2) and vectors of numerically zero singular values get no
  gradient. torch.linalg.svd's own backward divides 0 by 0 as soon as two singular values are equal, even
  unused ones (a map with dead channels), and turns the whole sample's gradient into NaN.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller
from kd_cli.methods.feature_utils import full_precision
from kd_cli.registry import NonNegative, PositiveInt

RBF_DENOMINATOR = 8.0  # the reference's exp(-d^2 / 8)
EXTRA_CANDIDATES = 3  # the student offers its top k+3 vectors to be aligned with the teacher's k


def as_matrices(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C) at full precision. Non-finite entries become 0 (the reference zeroes
    non-finite SVD outputs; here LAPACK never sees them, so a diverging student fails on its loss, not in SVD)."""
    x = full_precision(features).flatten(2).transpose(1, 2)
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class _TopRightSingularVectors(torch.autograd.Function):
    """x (B, m, n) -> its top `count` right singular vectors (B, n, count), with a guarded exact gradient.

    With lambda = s^2 the eigenvalues of x^T x, the derivative of a used vector v_i is
    sum_{j != i} v_j v_j^T d(x^T x) v_i / (lambda_i - lambda_j) over a full basis of R^n, which gives
    grad_x = U_p S_p C^T V^T + U S C V_p^T + U_p S_p^-1 G^T (I - V V^T),  C_ji = v_j.g_i / (lambda_i - lambda_j),
    the last term for the null space of x when n > m.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, count: int) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        ctx.save_for_backward(u, s, vh)
        ctx.count = count
        return vh[:, :count].transpose(1, 2).clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, s, vh = ctx.saved_tensors
        p, m, n = ctx.count, u.shape[1], vh.shape[2]
        tolerance = max(m, n) * torch.finfo(s.dtype).eps
        live = s[:, :p] > tolerance * s[:, :1]  # (B, p): a numerically zero value's vector is arbitrary
        grad = grad * live.unsqueeze(1)
        lam = s * s
        gap = lam[:, :p].unsqueeze(1) - lam.unsqueeze(2)  # (B, r, p): lambda_i - lambda_j
        equal = gap.abs() <= tolerance * lam[:, :1].unsqueeze(2)  # also j == i
        coupling = vh @ grad  # (B, r, p): v_j . g_i
        c = torch.where(equal, torch.zeros_like(gap), coupling / torch.where(equal, torch.ones_like(gap), gap))
        u_p, s_p = u[:, :, :p], s[:, :p]
        grad_x = (u_p * s_p.unsqueeze(1)) @ c.transpose(1, 2) @ vh
        grad_x = grad_x + (u * s.unsqueeze(1)) @ c @ vh[:, :p]
        if n > s.shape[1]:
            inverse = torch.where(live, 1 / torch.where(live, s_p, torch.ones_like(s_p)), torch.zeros_like(s_p))
            outside = grad - vh.transpose(1, 2) @ (vh @ grad)  # (I - V V^T) g_i
            grad_x = grad_x + (u_p * inverse.unsqueeze(1)) @ outside.transpose(1, 2)
        return grad_x, None


def top_right_singular_vectors(x: torch.Tensor, count: int) -> torch.Tensor:
    """(B, m, n) -> (B, n, count): the right singular vectors of the `count` largest singular values."""
    return _TopRightSingularVectors.apply(x, count)


def fixed_sign(vectors: torch.Tensor) -> torch.Tensor:
    """(B, n, k): each column's sign chosen so that its entry of largest magnitude is positive."""
    largest = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    return vectors * torch.where(largest < 0, -1.0, 1.0).to(vectors.dtype)


def align(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, n, p) candidates, (B, n, k) teacher vectors -> (B, n, k): for each teacher vector, the candidate
    of largest |cosine| with it, its sign flipped to agree (a cosine of exactly 0 keeps the sign, as the
    authors' TensorFlow code does; KD-Zoo would zero that vector)."""
    with torch.no_grad():
        cosine = student.transpose(1, 2) @ teacher  # (B, p, k)
        best = cosine.abs().argmax(dim=1, keepdim=True)  # (B, 1, k)
        sign = torch.where(cosine.gather(1, best) < 0, -1.0, 1.0).to(student.dtype)
    picked = student.gather(2, best.expand(-1, student.shape[1], -1))
    return picked * sign


def rbf_relations(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """(B, C_l, k), (B, C_{l-1}, k) -> (B, C_l, C_{l-1}, k): exp(-(a_l[m, j] - a_{l-1}[n, j])^2 / 8)."""
    return torch.exp(-(current.unsqueeze(2) - previous.unsqueeze(1)).pow(2) / RBF_DENOMINATOR)


def kdsvd_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], k: int) -> torch.Tensor:
    """Sum over consecutive layer pairs of the squared difference of the RBF relations, per sample summed,
    averaged over the batch. Each student map has the channels of its teacher map; grids may differ."""
    batch = student[0].shape[0]
    total, previous = student[0].new_zeros((), dtype=full_precision(student[0]).dtype), None
    # the decomposition and the kernel in float32 even under bf16/fp16 autocast (matmuls would run in bf16)
    with torch.autocast(student[0].device.type, enabled=False):
        for s_map, t_map in zip(student, teacher, strict=True):
            xs, xt = as_matrices(s_map), as_matrices(t_map.detach())
            with torch.no_grad():
                _, values, vh = torch.linalg.svd(xt, full_matrices=False)
                t_vectors = fixed_sign(vh[:, :k].transpose(1, 2))
                scale = F.normalize(values[:, :k], dim=1).unsqueeze(1)  # (B, 1, k)
            candidates = top_right_singular_vectors(xs, min(k + EXTRA_CANDIDATES, min(xs.shape[1:])))
            current = (align(candidates, t_vectors) * scale, t_vectors * scale)
            if previous is not None:
                relations_s = rbf_relations(current[0], previous[0])
                relations_t = rbf_relations(current[1], previous[1])
                total = total + (relations_s - relations_t).pow(2).sum() / batch
            previous = current
    return total


def connector(student_channels: int, teacher_channels: int) -> nn.Module:
    """1x1 conv + BN onto the teacher's channels (for unequal widths; none at equal widths)."""
    return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False), nn.BatchNorm2d(teacher_channels))


@register_method("kdsvd")
class KDSVD(FeatureDistiller):
    loss_weights = ("kdsvd_weight", "ce_weight", "kd_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        kdsvd_weight: NonNegative,
        k: PositiveInt,
        **common: Any,
    ):
        super().__init__(student, teacher, **common)
        if len(self.student_layers) < 2:
            raise KdError(
                f"method=kdsvd relates consecutive layers and needs at least 2 maps of each model, got 1 "
                f"('{self.student_layers[0]}' / '{self.teacher_layers[0]}'); name 2 or more with "
                f"method.student_layers / method.teacher_layers, or null for every stage"
            )
        self.require_maps()
        pairs = list(zip(self.student_layers, self.student_shapes, self.teacher_layers, self.teacher_shapes))
        for s_layer, s_shape, t_layer, t_shape in pairs:
            # the student's map is compared in the teacher's channels (through the connector when they differ)
            for role, layer, rank in (
                ("teacher", t_layer, min(t_shape[0], t_shape[1] * t_shape[2])),
                ("student", s_layer, min(t_shape[0], s_shape[1] * s_shape[2])),
            ):
                if k > rank:
                    raise KdError(
                        f"method.k={k} asks for more singular vectors than {role} layer '{layer}' has "
                        f"(min(H*W, C) = {rank}); lower method.k or tap larger maps"
                    )
        self.connectors = nn.ModuleList(
            [connector(s[0], t[0]) if s[0] != t[0] else nn.Identity() for _, s, _, t in pairs] if kdsvd_weight else []
        )  # no adapter for a term left out (DDP: every parameter must get a gradient)
        self.kdsvd_weight, self.k = kdsvd_weight, k

    # default_layers: every stage output (the base's), as mdistiller's feats[1:]

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student, teacher_logits, teacher = self.features(images, self.kdsvd_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.kdsvd_weight:
            student = [connect(s) for connect, s in zip(self.connectors, student)]
            terms["kdsvd"] = self.kdsvd_weight * kdsvd_loss(student, teacher, self.k)
        return logits, terms
