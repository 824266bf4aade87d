"""Saved models: model.safetensors (weights) + model.json (how to rebuild the network).

No pickled code anywhere: a model is rebuilt from its registry name and options, then its
weights are loaded from safetensors, and every mismatch is a one-line error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kd_cli.engine.files import atomic_write, read_json, write_json
from kd_cli.errors import KdError

WEIGHTS = "model.safetensors"
META = "model.json"
FORMAT = "kd-model/1"


@dataclass
class ModelSpec:
    """Everything needed to rebuild a saved network and feed it the right inputs."""

    arch: str
    kwargs: dict[str, Any]
    num_classes: int
    in_channels: int
    input_size: int
    mean: list[float]
    std: list[float]
    class_names: list[str]
    dataset: str
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. pruned layer shapes (compress)

    def build(self) -> nn.Module:
        from kd_cli.models import create_model

        # Saved weights replace any pretrained ones: never download them again to rebuild.
        options = {k: v for k, v in dict(self.kwargs).items() if k != "pretrained"}
        return create_model(self.arch, self.num_classes, self.in_channels, self.input_size, **options)


def save_model(directory: Path, model: nn.Module, spec: ModelSpec) -> Path:
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in _plain(model).state_dict().items()}
    state = _unshare(state)
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT}))
    write_json(directory / META, {"format": FORMAT, **asdict(spec)})
    return directory / WEIGHTS


def _plain(model: nn.Module) -> nn.Module:
    """The bare module under torch.compile / DDP wrappers, so keys carry no wrapper prefix."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights); give each its own copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def resolve_weights(path: str | Path) -> Path:
    """A run directory or a .safetensors file -> the weights file, with clear errors."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / WEIGHTS
        if not path.exists():
            raise KdError(f"no {WEIGHTS} in {path.parent}: is it a kd run directory of a finished run?")
    elif not path.exists():
        raise KdError(f"{path} does not exist; give a kd run directory or a {WEIGHTS} file")
    elif path.suffix != ".safetensors":
        raise KdError(f"{path} is not a .safetensors file; kd reads weights only from safetensors (no pickle)")
    return path


def load_spec(weights: Path) -> ModelSpec:
    meta_path = weights.with_name(META)
    if not meta_path.exists():
        raise KdError(f"no {META} beside {weights}: kd needs it to rebuild the network (arch, classes, input)")
    try:
        meta = read_json(meta_path)
        meta.pop("format", None)
        return ModelSpec(**meta)
    except (ValueError, TypeError) as error:
        raise KdError(f"{meta_path} is not a valid kd model description ({error})") from None


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec]:
    weights = resolve_weights(path)
    spec = load_spec(weights)
    model = spec.build()
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise KdError(f"{weights} is corrupt or not a safetensors file ({error})") from None
    load_state(model, state, f"{weights} (arch {spec.arch})")
    return model.to(device).eval(), spec


def load_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict, strict, with one line naming what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        details = []
        if wrong:
            k = wrong[0]
            details.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: saved {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            details.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise KdError(f"weights do not match {what}: {'; '.join(details)}; was it saved for another model or data set?")
    model.load_state_dict(state)
