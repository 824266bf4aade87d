"""An int8 model's state dict as plain safetensors tensors, and back, without pickle.

torch.ao's quantised state dicts hold quantised tensors (int8 values + per-tensor or per-channel
scale and zero point), tuples (packed linear params) and dtypes. Each quantised tensor is stored as
its int8 values plus `KEY.__scales` / `KEY.__zero_points` tensors; everything that is not a tensor is
described in a JSON layout kept in the safetensors header.
"""

from __future__ import annotations

import json
from typing import Any

import torch

LAYOUT_KEY = "kd_layout"
PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)


def needs_encoding(state: dict[str, Any]) -> bool:
    return any(not isinstance(v, torch.Tensor) or v.is_quantized for v in state.values())


def encode(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    tensors: dict[str, torch.Tensor] = {}
    layout = {key: _encode(key, value, tensors) for key, value in state.items()}
    return tensors, json.dumps(layout)


def _encode(key: str, value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, (tuple, list)):
        return {"tuple": [_encode(f"{key}.__{i}", item, tensors) for i, item in enumerate(value)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is None:
        return {"none": True}
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"cannot store {key} of type {type(value).__name__} in safetensors")
    value = value.detach().cpu()
    if not value.is_quantized:
        tensors[key] = value.contiguous()
        return {"tensor": key}
    tensors[key] = value.int_repr().contiguous()
    record: dict[str, Any] = {"quantized": key, "dtype": str(value.dtype).removeprefix("torch.")}
    if value.qscheme() in PER_CHANNEL:
        tensors[f"{key}.__scales"] = _narrow(value.q_per_channel_scales(), torch.float32)
        tensors[f"{key}.__zero_points"] = _narrow(value.q_per_channel_zero_points(), torch.int32)
        record["axis"] = value.q_per_channel_axis()
    else:
        record.update(scale=value.q_scale(), zero_point=value.q_zero_point())
    return record


def _narrow(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the bytes where that loses nothing (observers compute scales in float32; torch keeps
    them as float64), else the tensor as it is: the file is small *and* bit-exact."""
    narrow = tensor.to(dtype)
    return (narrow if torch.equal(narrow.to(tensor.dtype), tensor) else tensor).contiguous()


def decode(tensors: dict[str, torch.Tensor], layout_json: str) -> dict[str, Any]:
    layout = json.loads(layout_json)
    return {key: _decode(record, tensors) for key, record in layout.items()}


def _decode(record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if "tuple" in record:
        return tuple(_decode(item, tensors) for item in record["tuple"])
    if "dtype" in record and "quantized" not in record:
        return getattr(torch, record["dtype"])
    if record.get("none"):
        return None
    if "tensor" in record:
        return tensors[record["tensor"]]
    key, values = record["quantized"], tensors[record["quantized"]]
    if "axis" in record:
        return torch._make_per_channel_quantized_tensor(
            values, tensors[f"{key}.__scales"].double(), tensors[f"{key}.__zero_points"].long(), record["axis"]
        )
    return torch._make_per_tensor_quantized_tensor(values, record["scale"], record["zero_point"])
