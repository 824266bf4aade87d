"""Post-training int8 quantisation with PyTorch's torch.ao FX graph mode (x86 / fbgemm kernels).

Why torch.ao and not torchao: measured on this project's CPU (one thread), torch.ao's int8 conv and
linear kernels run eagerly and fast (a 28x28 CNN, batch 64: 36.5 ms fp32 -> 2.4 ms int8), while
torchao's int8 paths either need torch.compile/inductor to get int8 kernels (PT2E) or ran slower
than fp32 eagerly (Int8DynamicActivationInt8Weight on an MLP: 1.10 ms vs 0.63 ms). See README.

- static: conv, linear (and fused conv-bn-relu) get int8 weights (per channel) and int8
  activations whose ranges are observed on `calibration_batches` training batches;
- dynamic: linear layers only, int8 weights, activations quantised on the fly (no calibration).

The quantised model runs on the CPU. It is saved as plain int8 tensors + scales in safetensors
(qstate.py) and rebuilt on load by quantising a freshly built float model the same way.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from kd_cli.compress import register_step
from kd_cli.compress.context import StepContext
from kd_cli.compress.step import CompressionStep
from kd_cli.compress.surgery import WEIGHTED, check_layers, layer_map
from kd_cli.errors import KdError
from kd_cli.registry import PositiveInt

if TYPE_CHECKING:
    from torch.fx import GraphModule

log = logging.getLogger("kd")
Mode = Literal["static", "dynamic"]
Backend = Literal["x86", "fbgemm", "qnnpack", "onednn"]


@register_step("quantize_int8")
class QuantizeInt8(CompressionStep):
    """mode: static | dynamic; backend: the CPU kernel family (x86 for Intel/AMD, qnnpack for ARM);
    calibration_batches: training batches observed (static); layers: only these layers (empty: every
    conv/linear); skip: layers kept in float (often the first conv and the classifier)."""

    cpu_only = True  # torch.ao's int8 kernels: a saved int8 model loads onto the CPU

    def __init__(
        self, mode: Mode, backend: Backend, calibration_batches: PositiveInt, layers: list[str], skip: list[str]
    ):
        self.mode, self.backend, self.calibration_batches = mode, backend, calibration_batches
        self.layers, self.skip = list(layers), list(skip)

    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        self.check(model)
        model = model.cpu().eval()
        example = ctx.example.cpu()
        prepared = self._prepare(model, example)
        if self.mode == "static":
            with torch.no_grad():
                for images, _ in ctx.batches(self.calibration_batches):
                    prepared(images.cpu())
        quantized = _convert(prepared)
        count = quantized_layer_count(quantized)
        if count == 0:
            raise KdError("compression.quantize_int8 quantised no layer; check layers/skip")
        log.info(f"quantize_int8 ({self.mode}, {self.backend}): {count} layers in int8")
        ctx.record(kind=self.name, mode=self.mode, backend=self.backend, layers=self.layers, skip=self.skip)
        return quantized

    @staticmethod
    def validate_options(*, backend: str, **_) -> None:
        """The backend must also be compiled into this PyTorch build (a fact of this machine, not a range)."""
        missing = backend_missing(backend)
        if missing:
            raise KdError(f"compression.quantize_int8.backend={backend} {missing}")

    @staticmethod
    def rebuild(model: nn.Module, record: dict) -> nn.Module:
        missing = backend_missing(record["backend"])  # a model quantised on another machine
        if missing:
            raise KdError(f"this int8 model was quantised for backend {record['backend']}, which {missing}")
        step = QuantizeInt8(record["mode"], record["backend"], 1, record["layers"], record["skip"])
        shape = getattr(model, "kd_input_shape", None)
        if shape is None:
            raise KdError("cannot rebuild an int8 model whose input shape is unknown")
        return _convert(step._prepare(model.cpu().eval(), torch.zeros(1, *shape)))

    def check(self, model: nn.Module | Mapping[str, nn.Module]) -> None:
        """What can be checked before quantising (see compress.check_steps): `layers` names conv/linear
        layers of the model (Linear for dynamic), `skip` names layers of the model (a block: all of it),
        and something is left to quantise. Whether torch.fx can trace the model is known only by trying."""
        layers = layer_map(model)
        supported, kinds = ((nn.Linear,), "Linear") if self.mode == "dynamic" else (WEIGHTED, "Conv1d/2d/3d and Linear")
        check_layers(
            layers,
            self.layers,
            "compression.quantize_int8.layers",
            supported,
            f"{self.mode} int8 quantises {kinds} layers (BatchNorm and activations are fused into the "
            f"conv before them)",
        )
        check_layers(layers, self.skip, "compression.quantize_int8.skip")
        if self.mode == "dynamic" and not any(isinstance(m, nn.Linear) for m in layers.values()):
            raise KdError(
                "compression.quantize_int8.mode=dynamic quantises Linear layers only and this model has "
                "none; use mode=static for conv nets"
            )
        if self.layers and set(self.layers) <= set(self.skip):
            raise KdError(
                "compression.quantize_int8: every layer in layers is also in skip, so nothing would be "
                "quantised; leave them out of skip"
            )

    def _prepare(self, model: nn.Module, example: torch.Tensor) -> GraphModule:
        from torch.ao.quantization import (
            QConfigMapping,
            default_dynamic_qconfig,
            get_default_qconfig,
        )
        from torch.ao.quantization.quantize_fx import prepare_fx

        torch.backends.quantized.engine = self.backend
        qconfig = default_dynamic_qconfig if self.mode == "dynamic" else get_default_qconfig(self.backend)
        mapping = QConfigMapping()
        if self.layers:
            for name in self.layers:
                mapping.set_module_name(name, qconfig)
        else:
            mapping.set_global(qconfig)
        for name in self.skip:
            mapping.set_module_name(name, None)
        if self.mode == "dynamic":
            mapping.set_object_type(nn.Conv2d, None)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao's deprecation notice, on every call
                return prepare_fx(model, mapping, example_inputs=(example,))
        except Exception as error:  # FX cannot trace data-dependent Python control flow
            raise KdError(
                f"compression.quantize_int8 cannot trace this model with torch.fx "
                f"({type(error).__name__}: {str(error).splitlines()[0][:160]}); int8 needs a traceable "
                f"model"
            ) from None


def backend_missing(backend: str) -> str | None:
    """Why the quantised-kernel family `backend` cannot run here (not in this PyTorch build), or None."""
    available = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if backend in available:
        return None
    return f"is not available in this PyTorch build (available: {', '.join(available)})"


def _convert(prepared: GraphModule) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # also: observers that saw no data (rebuild; load sets the values)
        return convert_fx(prepared).eval()


def quantized_layer_count(model: nn.Module) -> int:
    return sum(
        1 for m in model.modules() if ".quantized" in type(m).__module__ and hasattr(m, "weight") and callable(m.weight)
    )
