"""Saved models: model.safetensors (weights) + model.json (how to rebuild the network).

No pickled code anywhere: a model is rebuilt from its registry name and options, then its
weights are loaded from safetensors, and every mismatch is a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kd_cli.engine.device import random_stream
from kd_cli.engine.files import atomic_write, write_json
from kd_cli.errors import KdError
from kd_cli.saved_forms import decode_state, encode_state, rebuild, runs_on_cpu_only

WEIGHTS = "model.safetensors"
META = "model.json"
FORMAT = "kd-model/1"
INITIAL_WEIGHTS = ("pretrained", "weights")  # model options that say where training starts from


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

    def build(self, initial: bool = False) -> nn.Module:
        """The network; `initial=True` starts from the weights its options name (`pretrained`, `weights=`),
        as training does. Rebuilding a saved model skips them: its own weights replace them, so nothing
        is downloaded or read again (and a weights file that has moved since does not matter)."""
        from kd_cli.models import create_model

        options = dict(self.kwargs)
        if initial:  # (the caller decides which random stream the initialisation draws from)
            return create_model(self.arch, self.num_classes, self.in_channels, self.input_size, **options)
        options = {k: v for k, v in options.items() if k not in INITIAL_WEIGHTS}
        with random_stream(None):  # its draws are overwritten: they must not move the run's generators
            return create_model(self.arch, self.num_classes, self.in_channels, self.input_size, **options)


def save_model(directory: Path, model: nn.Module, spec: ModelSpec) -> Path:
    directory = Path(directory)
    tensors, metadata = weights_for_file(model)
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    write_json(directory / META, {"format": FORMAT, **asdict(spec)})
    return directory / WEIGHTS


def weights_for_file(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of model.safetensors (int8 state encoded: kd_cli/saved_forms.py)."""
    state, header = encode_state(_plain(model).state_dict())
    return _unshare({k: v.detach().contiguous().cpu() for k, v in state.items()}), {"format": FORMAT, **header}


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
    if not str(path).strip():
        raise KdError(
            "run= is empty; give a kd run directory or a model.safetensors file, e.g. run=outputs/distill/..."
        )
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


def weights_digest(path: str | Path) -> str:
    """A short sha256 of a saved model's weights file: a resumed run checks its teacher (or the model
    it compresses) is still the one it started with, not just a file at the same path."""
    digest = hashlib.sha256()
    with open(resolve_weights(path), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load_spec(weights: Path) -> ModelSpec:
    meta_path = weights.with_name(META)
    if not meta_path.exists():
        raise KdError(f"no {META} beside {weights}: kd needs it to rebuild the network (arch, classes, input)")
    try:
        return spec_from_text(meta_path.read_text(), str(meta_path))
    except OSError as error:
        raise KdError(f"cannot read {meta_path} ({error.strerror or error})") from None


def spec_from_text(text: str, where: str) -> ModelSpec:
    """A model.json's content (from its file, or embedded in an exported model) as a ModelSpec, every
    value checked: a damaged or hand-edited file is one line naming it, not torch's words (or wrong output)
    when the model is built or fed."""
    try:
        meta = json.loads(text)
        meta.pop("format", None)
        spec = ModelSpec(**meta)
    except (ValueError, TypeError, AttributeError) as error:
        raise KdError(f"{where} is not a valid kd model description ({brief_reason(error)})") from None
    if problem := _spec_problem(spec):
        raise KdError(f"{where} is not a valid kd model description ({problem}); restore it from the run that made it")
    return spec


def _spec_problem(spec: ModelSpec) -> str | None:
    def whole(value: Any, low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    def numbers(values: Any) -> bool:
        return (
            isinstance(values, list)
            and bool(values)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        )

    if not isinstance(spec.arch, str) or not spec.arch:
        return "arch is not a model name"
    if not isinstance(spec.kwargs, dict) or not isinstance(spec.extra, dict):
        return "kwargs and extra must be mappings"
    if (
        not whole(spec.num_classes, 1, 10**6)
        or not whole(spec.in_channels, 1, 64)
        or not whole(spec.input_size, 1, 16384)
    ):
        return "num_classes, in_channels and input_size must be whole numbers in range"
    names = spec.class_names
    if not isinstance(names, list) or len(names) != spec.num_classes or not all(isinstance(n, str) for n in names):
        return f"class_names must list {spec.num_classes} names"
    if len(set(names)) != len(names):
        return f"class_names repeats {next(n for n in names if names.count(n) > 1)!r}"
    for key in ("mean", "std"):
        values = getattr(spec, key)
        if not numbers(values) or len(values) not in (1, spec.in_channels):
            return f"{key} must be 1 or {spec.in_channels} finite numbers"
    if any(v <= 0 for v in spec.std):
        return "std must be > 0"
    return None


def brief_reason(error: BaseException) -> str:
    return str(error).splitlines()[0][:120] if str(error) else type(error).__name__


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """The saved network on `device` (int8 models stay on the CPU, where their kernels run)."""
    weights = resolve_weights(path)
    spec = load_spec(weights)
    model = spec.build()
    transforms = spec.extra.get("transforms", [])
    if transforms:  # compressed: redo the saved structure (pruned widths, factorised layers, int8)
        model = rebuild(model, transforms)
        if runs_on_cpu_only(transforms):
            device = "cpu"
    state = read_weights(weights)
    load_state(model, state, f"{weights} (arch {spec.arch})")
    return model.to(device).eval(), spec


def read_weights(weights: Path) -> dict[str, Any]:
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
        return decode_state(load_file(str(weights), device="cpu"), header)
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise KdError(f"{weights} is corrupt or not a safetensors file ({error})") from None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict, strict, with one line naming what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and _shape(own[k]) != _shape(state[k])]
    retyped = [k for k in own if k in state and k not in wrong and _loses(state[k], own[k])]
    if missing or unexpected or wrong or retyped:
        details = []
        if retyped:
            k = retyped[0]
            details.append(
                f"{len(retyped)} of another kind of number, e.g. {k}: saved {state[k].dtype} vs {own[k].dtype}"
            )
        if wrong:
            k = wrong[0]
            details.append(
                f"{len(wrong)} shape mismatch(es), e.g. {k}: saved {_shape(state[k])} vs model {_shape(own[k])}"
            )
        if missing:
            details.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise KdError(f"weights do not match {what}: {'; '.join(details)}; was it saved for another model or data set?")
    # Module versions are not in the file; the rebuilt model's own are the ones that wrote it (same
    # code), and torch.ao's int8 layers read their weights differently without them.
    state = OrderedDict(state)
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state)


def _loses(value: Any, target: Any) -> bool:
    from kd_cli.models.foreign_weights import cast_loses

    return isinstance(value, torch.Tensor) and isinstance(target, torch.Tensor) and cast_loses(value, target)


def _shape(value: Any) -> Any:
    """A tensor's shape; for packed int8 params (tuples) the shapes inside; else the value's type."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple):
        return tuple(_shape(v) for v in value)
    return type(value).__name__
