"""The before/after figures of `kd compress`: parameters, MACs, size on disk, sparsity, CPU latency, and
the task's headline score (top-1, mIoU)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from kd_cli.compress.prune_unstructured import copyable, make_permanent
from kd_cli.compress.surgery import weight_sparsity
from kd_cli.engine.artifacts import ModelSpec, weights_for_file
from kd_cli.stages.evaluate import count_macs, measure_latency
from kd_cli.stages.models import count_parameters


@dataclass
class Measurement:
    step: str
    params: int
    macs: int
    size_bytes: int
    sparsity: float
    latency_ms: dict[int, float]  # CPU, median ms per batch, by batch size
    score: float  # the task's headline metric on the test split (top-1 %, mIoU %)
    metric: str = "top1"  # its name: the row's column ("top1", "miou")

    def row(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("latency_ms", "score", "metric")}
        out[self.metric] = self.score
        out.update({f"latency_b{b}_ms": ms for b, ms in self.latency_ms.items()})
        return out


def saved_form(model: nn.Module) -> nn.Module:
    """The model as it will be saved: pruning masks folded in (on a copy; training keeps the masks)."""
    has_masks = any(name.endswith("_mask") for name, _ in model.named_buffers())
    return make_permanent(copy.deepcopy(copyable(model))) if has_masks else model


def size_on_disk(model: nn.Module) -> int:
    tensors, metadata = weights_for_file(model)
    return len(save(tensors, metadata=metadata))


def measure(
    step: str,
    model: nn.Module,
    spec: ModelSpec,
    *,
    score_of: Callable[[nn.Module], float],
    metric: str,
    batch_sizes: list[int],
    batches: int,
    params: int | None = None,
    macs: int | None = None,
) -> Measurement:
    """`score_of(model)` -> the headline metric on the test split; params/MACs may be carried over
    (an int8 model has the same weights and multiply-adds, stored and done in 8 bits)."""
    model = saved_form(model).eval()
    device = next((t.device for t in model.state_dict().values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    score = score_of(model)
    on_cpu = model if device.type == "cpu" else copy.deepcopy(model).cpu()
    return Measurement(
        step=step,
        params=params if params is not None else count_parameters(model),
        macs=macs if macs is not None else count_macs(model, spec, device),
        size_bytes=size_on_disk(model),
        sparsity=weight_sparsity(model),
        latency_ms={b: measure_latency(on_cpu, spec, torch.device("cpu"), b, batches) for b in batch_sizes},
        score=score,
        metric=metric,
    )
