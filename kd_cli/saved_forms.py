"""What a saved model may carry beyond a network of its architecture with float weights, and how to read it.

A compression step changes a network's structure (pruned widths, factorised layers, int8 modules) and
records each change in model.json's `transforms`; int8 state holds quantised tensors that safetensors
cannot store as they are. The layer that makes these forms (kd_cli/compress) registers here how to redo
each structure change and how to encode such state; the artifact files (engine/artifacts) read and write
saved models through this module, so they know no compression step, and the layers point one way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from kd_cli.errors import KdError

Rebuild = Callable[[nn.Module, dict[str, Any]], nn.Module]


@dataclass(frozen=True)
class Transform:
    rebuild: Rebuild  # redo the recorded change on a freshly built network
    cpu_only: bool = False  # the result runs on the CPU only (torch.ao's int8 kernels)


@dataclass(frozen=True)
class StateCodec:
    """A form of state dict that safetensors cannot hold as is, stored as plain tensors plus a header entry."""

    header_key: str  # its entry in the safetensors header metadata
    applies: Callable[[dict[str, Any]], bool]
    encode: Callable[[dict[str, Any]], tuple[dict[str, Any], str]]  # state -> (plain tensors, header value)
    decode: Callable[[dict[str, Any], str], dict[str, Any]]


TRANSFORMS: dict[str, Transform] = {}
CODECS: list[StateCodec] = []


def register_transform(kind: str, rebuild: Rebuild, *, cpu_only: bool = False) -> None:
    TRANSFORMS[kind] = Transform(rebuild, cpu_only)


def register_codec(codec: StateCodec) -> None:
    CODECS.append(codec)


def rebuild(model: nn.Module, transforms: list[Any]) -> nn.Module:
    """Redo every recorded structure change, in order, on a freshly built model."""
    for record in transforms:
        kind = record.get("kind", "?") if isinstance(record, dict) else "?"
        if kind not in TRANSFORMS:
            known = ", ".join(sorted(TRANSFORMS)) or "none registered"
            raise KdError(
                f"model.json records a '{kind}' change that this kd cannot redo (it knows: {known}); "
                f"was it written by another kd version, or edited?"
            )
        try:
            model = TRANSFORMS[kind].rebuild(model, record)
        except KdError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
            raise KdError(
                f"model.json's '{kind}' record does not fit the rebuilt {type(model).__name__} "
                f"({type(error).__name__}: {error}); was model.json edited, or written for another "
                f"model?"
            ) from None
    return model


def runs_on_cpu_only(transforms: list[Any]) -> bool:
    """True when a recorded change leaves a model that runs on the CPU only (int8)."""
    return any(
        isinstance(t, dict) and t.get("kind") in TRANSFORMS and TRANSFORMS[t["kind"]].cpu_only for t in transforms
    )


def encode_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A state dict as plain tensors, and the header entries that say how to read them back."""
    header: dict[str, str] = {}
    for codec in CODECS:
        if codec.applies(state):
            state, header[codec.header_key] = codec.encode(state)
    return state, header


def decode_state(tensors: dict[str, Any], header: dict[str, str]) -> dict[str, Any]:
    for codec in reversed(CODECS):
        if codec.header_key in header:
            tensors = codec.decode(tensors, header[codec.header_key])
    unknown = [key for key in header if key.startswith("kd_") and key not in {c.header_key for c in CODECS}]
    if unknown:
        raise KdError(
            f"the weights file's header holds {', '.join(unknown)}, a form this kd cannot read; "
            f"was it written by another kd version?"
        )
    return tensors
