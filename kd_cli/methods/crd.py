"""`method=crd`: Tian, Krishnan & Isola, "Contrastive Representation Distillation" (ICLR 2020).

Student and teacher embeddings go through linear heads to `feat_dim` and are L2-normalised. Two
memory banks hold one slowly updated embedding per training sample: the student's and the
teacher's. Each direction is an NCE problem (the paper's eq. 18, RepDistiller's `ContrastLoss`):
the anchor from one network is scored against the other network's memory row of the same sample
(the positive) and of `nce_k` samples drawn uniformly (the negatives),

    h = exp(<memory_row, anchor> / T) / Z,  P_noise = 1 / N,
    loss = -(1/B) * sum_batch [ log(h+ / (h+ + K P_noise)) + sum_K log(K P_noise / (h- + K P_noise)) ],

and the CRD term is the sum of both directions (student anchor vs teacher memory, teacher anchor
vs student memory). Z is a constant per direction, estimated on the first batch as
mean(exp(score / T)) * N and then frozen, as RepDistiller's `ContrastMemory` does. After scoring,
each batch sample's memory rows move toward its new embedding with momentum and are re-normalised.

Differences from RepDistiller, on purpose: negatives are drawn uniformly from the other N - 1
samples (never the anchor itself), and `nce_k` is clamped to N - 1 on small data sets (with one
warning). RepDistiller's CIFAR script instead draws negatives from samples of other classes
(`--mode exact`); that needs every sample's label inside the method, which kd does not pass.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import FeatureDistiller, embedding_layers
from kd_cli.registry import NonNegative, Positive, Range

log = logging.getLogger("kd")

NCE_EPS = 1e-7  # RepDistiller's eps in the NCE denominators
# The memory's momentum: 1 would never move a row (0 replaces each row by the newest embedding).
Momentum = Annotated[float, Range(0, 1, high_open=True)]


def nce_loss(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Eq. 18 for one direction. `scores` (B, 1+K) are exp(<m, a>/T)/Z, the positive in column 0."""
    negatives = scores.shape[1] - 1
    noise = negatives / num_samples  # K * P_noise with a uniform noise distribution
    positive, negative = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + NCE_EPS))
    log_d0 = torch.log(noise / (negative + noise + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def contrast_scores(anchor: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(<memory[rows[b, k]], anchor[b]> / T): (B, D) anchors against (B, 1+K) memory rows."""
    weights = memory[rows]  # a copy: the later in-place memory update cannot touch the graph
    return torch.exp(torch.bmm(weights, anchor.unsqueeze(2)).squeeze(2) / temperature)


def momentum_update(memory: torch.Tensor, index: torch.Tensor, embeddings: torch.Tensor, momentum: float) -> None:
    """memory[i] <- normalise(momentum * memory[i] + (1 - momentum) * embedding), in place."""
    rows = memory[index] * momentum + embeddings.detach().to(memory.dtype) * (1 - momentum)
    memory.index_copy_(0, index, F.normalize(rows, dim=1))


def gather_from_all_ranks(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Under DDP, every rank's batch concatenated (equal batch sizes: the training loader drops the tail).

    DDP broadcasts rank 0's buffers before each forward, so each rank must apply every rank's
    memory update, or the rows of samples seen by the other ranks would never move.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors)
    gathered = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        gathered.append(torch.cat(parts))
    return gathered


def draw_negatives(index: torch.Tensor, count: int, num_samples: int) -> torch.Tensor:
    """(B, count) indices uniform over the N - 1 samples other than each anchor (with replacement)."""
    drawn = torch.randint(0, num_samples - 1, (len(index), count), device=index.device)
    return drawn + (drawn >= index.unsqueeze(1)).long()  # skip the anchor: shift the upper part by one


def uniform_memory(num_samples: int, dim: int) -> torch.Tensor:
    """RepDistiller's initialisation: uniform in +-1/sqrt(dim/3), so rows have about unit norm."""
    bound = 1.0 / math.sqrt(dim / 3)
    return torch.rand(num_samples, dim).mul_(2 * bound).sub_(bound)


class Embed(nn.Module):
    """Flatten, linear map to the contrast space, L2-normalise (in float32, also under autocast)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)


def clamp_negatives(nce_k: int, num_samples: int) -> int:
    if nce_k <= num_samples - 1:
        return nce_k
    log.warning(
        f"crd: method.nce_k={nce_k} but the training split has {num_samples} samples; "
        f"using {num_samples - 1} negatives per sample"
    )
    return num_samples - 1


@register_method("crd")
class CRD(FeatureDistiller):
    needs_index = True
    single_layer = True  # one embedding per model
    loss_weights = ("crd_weight", "ce_weight", "kd_weight")
    # buffers (register_buffer), declared so that they are typed as tensors, not through nn.Module.__getattr__
    memory_student: torch.Tensor
    memory_teacher: torch.Tensor
    normaliser: torch.Tensor

    def __init__(
        self,
        student,
        teacher,
        *,
        num_samples: int | None,
        feat_dim: Annotated[int, Range(1, 65536)],
        nce_k: Annotated[int, Range(1, 2**20)],
        nce_t: Positive,
        nce_momentum: Momentum,
        crd_weight: NonNegative,
        **common: Any,
    ):
        check_num_samples(num_samples)
        assert num_samples is not None  # check_num_samples refuses None
        super().__init__(student, teacher, **common)
        self.num_samples, self.nce_t, self.nce_momentum = num_samples, nce_t, nce_momentum
        self.crd_weight = crd_weight
        if not crd_weight:  # the heads and memories serve the CRD term only, which is left out
            return
        self.nce_k = clamp_negatives(nce_k, num_samples)
        self.embed_student = Embed(math.prod(self.student_shapes[0]), feat_dim)
        self.embed_teacher = Embed(math.prod(self.teacher_shapes[0]), feat_dim)
        # Buffers, so they are in the method's state_dict (resume) and never in the student's.
        self.register_buffer("memory_student", uniform_memory(num_samples, feat_dim))
        self.register_buffer("memory_teacher", uniform_memory(num_samples, feat_dim))
        # Z for (student anchor, teacher anchor); negative = not estimated yet.
        self.register_buffer("normaliser", torch.full((2,), -1.0))
        self._normaliser_known = False  # once true, no per-step host sync to check the buffer

    def default_layers(self, model: nn.Module) -> list[str]:
        return embedding_layers(model)

    # A third argument beyond the base's (hence the ignore): needs_index, so the loop passes the batch's
    # sample indices too.
    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor):  # type: ignore[override]
        logits, student, teacher_logits, teacher = self.features(images, self.crd_weight)
        terms = self.logit_terms(logits, teacher_logits, labels)
        if self.crd_weight:
            terms["crd"] = self.crd_weight * self.contrast_loss(student[0], teacher[0], index)
        return logits, terms

    def contrast_loss(
        self, student_feature: torch.Tensor, teacher_feature: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """Both NCE directions; then the memory update (after scoring, as in RepDistiller)."""
        student = self.embed_student(student_feature)
        teacher = self.embed_teacher(teacher_feature)
        rows = torch.cat([index.unsqueeze(1), draw_negatives(index, self.nce_k, self.num_samples)], dim=1)
        # exp(score / 0.07) spans ~1e6: float32 even under bf16/fp16 autocast
        with torch.autocast(student.device.type, enabled=False):
            student_scores = contrast_scores(student, self.memory_teacher, rows, self.nce_t)
            teacher_scores = contrast_scores(teacher, self.memory_student, rows, self.nce_t)
            self.estimate_normaliser(student_scores, teacher_scores)
            loss = nce_loss(student_scores / self.normaliser[0], self.num_samples) + nce_loss(
                teacher_scores / self.normaliser[1], self.num_samples
            )
        with torch.no_grad():
            index, student, teacher = gather_from_all_ranks(index, student.detach(), teacher.detach())
            momentum_update(self.memory_student, index, student, self.nce_momentum)
            momentum_update(self.memory_teacher, index, teacher, self.nce_momentum)
        return loss

    @torch.no_grad()
    def estimate_normaliser(self, student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> None:
        """Z = mean(exp(score / T)) * N on the first batch, then fixed (a buffer: kept across resume)."""
        if self._normaliser_known:
            return
        self._normaliser_known = True
        if self.normaliser[0] < 0:  # a resumed run already has its Z
            z = torch.stack([student_scores.mean(), teacher_scores.mean()]) * self.num_samples
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(z)  # one Z for all ranks: the mean of their first batches
                z /= dist.get_world_size()
            self.normaliser.copy_(z)
            z_student, z_teacher = self.normaliser.tolist()
            log.info(f"crd: normalisation constants Z = {z_student:.1f} (student), {z_teacher:.1f} (teacher)")


def check_num_samples(num_samples: int | None) -> None:
    """The training split's size (from the data, not an option)."""
    if num_samples is None:
        raise KdError(
            "method=crd keeps a memory per training sample and needs the training split's size "
            "(num_samples); build it through build_method"
        )
    if num_samples < 2:
        raise KdError(f"method=crd needs at least 2 training samples (negatives), got {num_samples}")
