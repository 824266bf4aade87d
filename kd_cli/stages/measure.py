"""The before/after figures of `kd compress`: parameters, MACs, size on disk, sparsity, CPU latency, top-1."""

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
from kd_cli.tasks.classification import topk_accuracy


@dataclass
class Measurement:
    step: str
    params: int
    macs: int
    size_bytes: int
    sparsity: float
    latency_ms: dict[int, float]  # CPU, median ms per batch, by batch size
    top1: float

    def row(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "latency_ms"}
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
    predict_on: Callable[[nn.Module], tuple],
    batch_sizes: list[int],
    batches: int,
    params: int | None = None,
    macs: int | None = None,
) -> Measurement:
    """`predict_on(model)` -> (logits, labels) of the test split; params/MACs may be carried over
    (an int8 model has the same weights and multiply-adds, stored and done in 8 bits)."""
    model = saved_form(model).eval()
    device = next((t.device for t in model.state_dict().values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    logits, labels = predict_on(model)
    on_cpu = model if device.type == "cpu" else copy.deepcopy(model).cpu()
    return Measurement(
        step=step,
        params=params if params is not None else count_parameters(model),
        macs=macs if macs is not None else count_macs(model, spec, device),
        size_bytes=size_on_disk(model),
        sparsity=weight_sparsity(model),
        latency_ms={b: measure_latency(on_cpu, spec, torch.device("cpu"), b, batches) for b in batch_sizes},
        top1=topk_accuracy(logits, labels),
    )
