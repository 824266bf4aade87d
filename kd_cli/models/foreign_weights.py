"""Reading the weights people actually have into a network: plain state dicts (.pt/.pth/.bin/.ckpt,
read with `torch.load(weights_only=True)`: a pickle that would run code is refused), safetensors
files, training checkpoints that nest the state dict (`state_dict`, `model`, `ema`, ...), keys
prefixed by a wrapper (`module.` from DDP, `model.` from Lightning, `_orig_mod.` from torch.compile),
and Hugging Face `save_pretrained` folders (model.safetensors or pytorch_model.bin inside).

`fit_state` matches such a state to a model: wrapper prefixes are stripped where that makes more keys
match, and what still does not match is reported in one line (counts and the first few names), never
as a wall of text.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_cli.errors import KdError

# Where training code nests the model's state dict, in the order tried (`nested=` picks one).
NESTED_KEYS = (
    "state_dict",
    "model",
    "model_state_dict",
    "module",
    "net",
    "network",
    "ema",
    "model_ema",
    "state_dict_ema",
    "params",
)
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "net.", "network.", "backbone.", "student.", "ema.")
HF_FILES = ("model.safetensors", "pytorch_model.bin")
SHOWN = 3  # names shown per kind of mismatch


def read_state_dict(path: str | Path, nested: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file or Hugging Face folder, unnested (`nested`: the key to take)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = _hf_weights(path)
    if path.exists() and not path.is_file():
        raise KdError(f"{path} is not a regular file (a FIFO, a socket or a device); give the weights file itself")
    if not path.is_file():
        raise KdError(
            f"weights file {path} does not exist; give a .safetensors, .pt/.pth file or a save_pretrained folder"
        )
    raw = _load(path)
    return _unnest(raw, path, nested)


def _hf_weights(folder: Path) -> Path:
    for name in HF_FILES:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.safetensors.index.json")) or any(folder.glob("pytorch_model.bin.index.json")):
        raise KdError(
            f"{folder} holds a sharded checkpoint; save it as one file (save_pretrained with a large "
            "max_shard_size) and import that"
        )
    raise KdError(f"{folder} has none of {', '.join(HF_FILES)}; give a weights file or a save_pretrained folder")


def _load(path: Path) -> Any:
    kind = file_kind(path)
    if kind == "safetensors" or (kind is None and path.suffix == ".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise KdError(f"{path} is corrupt or not a safetensors file ({brief_error(error)})") from None
    if kind is None:
        raise KdError(
            f"{path} is not a checkpoint (neither torch.save's zip or pickle format nor safetensors); "
            "give the weights file your training code saved"
        )
    if kind == "tar":
        raise KdError(
            f"{path} is in the tar format of PyTorch before 1.6, which cannot be read without running its "
            "code; load it with that PyTorch and save model.state_dict() again"
        )
    try:
        with warnings.catch_warnings():  # torch explains refusals in warnings too; kd says it in one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error):  # the pickle itself is broken
            raise KdError(f"{path} is a corrupt PyTorch checkpoint ({brief_error(error)})") from None
        raise KdError(
            f"{path} holds more than tensors and plain values (objects whose loading may run code); kd "
            "reads only weights (weights_only=True): save model.state_dict() instead"
        ) from None
    except Exception as error:  # noqa: BLE001 - a damaged file makes torch raise any class (IndexError, KeyError...)
        raise KdError(f"{path} is a corrupt PyTorch checkpoint ({brief_error(error)})") from None


def file_kind(path: Path) -> str | None:
    """What a weights file is by its first bytes, not its name: "zip" (torch.save), "pickle" (torch.save's
    legacy format), "tar" (PyTorch before 1.6), "safetensors", or None (none of them)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as error:
        raise KdError(f"cannot read {path} ({error.strerror or error})") from None
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head[257:262] == b"ustar":
        return "tar"
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    return None


def _unnest(raw: Any, path: Path, nested: str | None) -> dict[str, torch.Tensor]:
    if not isinstance(raw, Mapping):
        raise KdError(f"{path} holds a {type(raw).__name__}, not a state dict; save model.state_dict()")
    if nested:
        if not isinstance(raw.get(nested), Mapping):
            keys = ", ".join(k for k, v in raw.items() if isinstance(v, Mapping)) or "none"
            raise KdError(f"{path} has no state dict under '{nested}' (keys holding one: {keys})")
        raw = raw[nested]
    else:
        # A training checkpoint may hold a tensor or two beside the nested state dict ({"state_dict": ...,
        # "best_acc1": tensor(93.2)}): the mapping with the most tensors is the model's.
        inner = max(
            (key for key in NESTED_KEYS if isinstance(raw.get(key), Mapping) and _is_state(raw[key])),
            key=lambda key: _tensor_count(raw[key]),
            default=None,
        )
        if inner is not None and (not _is_state(raw) or _tensor_count(raw[inner]) > _tensor_count(raw)):
            raw = raw[inner]
        elif not _is_state(raw):
            raise KdError(
                f"{path} holds no state dict (top-level keys: {', '.join(list(map(str, raw))[:8])}); "
                f"name the key that holds it with nested=KEY"
            )
    state = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise KdError(f"{path} holds no tensors")
    return state


def _tensor_count(mapping: Mapping) -> int:
    return sum(isinstance(v, torch.Tensor) for v in mapping.values())


def _is_state(mapping: Mapping) -> bool:
    values = list(mapping.values())
    return bool(values) and sum(isinstance(v, torch.Tensor) for v in values) >= max(1, len(values) // 2)


def strip_wrappers(state: dict[str, torch.Tensor], wanted: set[str], depth: int = 3) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (`module.`, `model.`, `_orig_mod.`, ... up to `depth` of them stacked, e.g.
    `module._orig_mod.`) in the way that makes the most keys match `wanted`; unchanged when none helps."""
    best, best_matches = state, len(wanted & state.keys())
    frontier = [state]
    for _ in range(depth):
        grown = []
        for current in frontier:
            for prefix in WRAPPER_PREFIXES:
                if not any(k.startswith(prefix) for k in current):
                    continue
                stripped = {k.removeprefix(prefix): v for k, v in current.items()}
                if len(stripped) != len(current):
                    continue  # two keys would collide: not a wrapper prefix
                grown.append(stripped)
                matches = len(wanted & stripped.keys())
                if matches > best_matches:
                    best, best_matches = stripped, matches
        frontier = grown
    for prefix in WRAPPER_PREFIXES:  # kd's own wrapper around a network built elsewhere (`model.`: arch=hf)
        prefixed = {prefix + k: v for k, v in best.items()}
        if len(wanted & prefixed.keys()) > best_matches:
            return prefixed
    return best


def fit_state(
    model: nn.Module, state: dict[str, torch.Tensor], what: str, *, replaceable: tuple[str, ...] = ()
) -> list[str]:
    """Load `state` into `model` strictly after stripping wrapper prefixes. Keys under a module named in
    `replaceable` (e.g. the classifier, when the classes differ) may be missing or of another shape:
    they keep the model's fresh values. Returns the keys left fresh; any other mismatch is one line."""
    own = model.state_dict()
    state = _renamed_as_built(strip_wrappers(state, set(own)), set(own), getattr(model, "kd_foreign_key_map", {}))
    fresh = lambda key: any(key == r or key.startswith(r + ".") for r in replaceable)  # noqa: E731
    # BatchNorm's step counter, absent from older checkpoints, starts at 0 as torch's own loading leaves it
    missing = [k for k in own if k not in state and not fresh(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape and not fresh(k)]
    if missing or unexpected or shapes:
        raise KdError(
            f"{what}: the weights do not fit the model: {_mismatch(missing, unexpected, shapes, state, own)}; "
            "check the architecture (arch=, its kwargs) and the number of classes"
        )
    kept = {k: v for k, v in state.items() if not (fresh(k) and v.shape != own[k].shape)}
    _check_dtypes(kept, own, what)
    left = [k for k in own if k not in kept]
    model.load_state_dict({**own, **kept}, strict=True)
    return left


def _check_dtypes(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], what: str) -> None:
    """Values a model can hold as they were trained: real floats for its floating tensors (any width),
    whole numbers for its integer ones. Complex, quantised, boolean or integer weights for a float
    tensor would be cast with a loss torch only warns about (or none at all): refused in one line."""
    wrong = [k for k, v in state.items() if cast_loses(v, own[k])]
    if wrong:
        shown = ", ".join(f"{k}: {_dtype(state[k])} for {_dtype(own[k])}" for k in wrong[:SHOWN])
        raise KdError(
            f"{what}: {len(wrong)} tensor(s) hold values the model cannot take as they were trained (e.g. "
            f"{shown}); give the real-valued weights the model was trained with"
        )


def cast_loses(value: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether loading `value` into `target`'s dtype would change what the model computes (a sparse or a
    meta tensor, which holds no values, cannot be loaded at all)."""
    if value.layout != torch.strided or value.is_meta:
        return True
    if value.is_quantized or target.is_quantized:
        return value.is_quantized != target.is_quantized or value.dtype != target.dtype
    if value.is_complex() != target.is_complex():
        return True
    if target.is_floating_point():
        return not value.is_floating_point()
    if value.is_floating_point():  # into an integer tensor (a BatchNorm's count): whole numbers only
        return not bool(torch.isfinite(value).all() and torch.equal(value, value.round()))
    return value.dtype == torch.bool and target.dtype != torch.bool


def _dtype(tensor: torch.Tensor) -> str:
    kind = "meta (no values) " if tensor.is_meta else "sparse " if tensor.layout != torch.strided else ""
    return kind + str(tensor.dtype).removeprefix("torch.")


def _renamed_as_built(
    state: dict[str, torch.Tensor], wanted: set[str], renames: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Keys a builder renamed when it adapted a network (`kd_foreign_key_map`: torchvision's `classifier.` is
    kd's `classifier.head.`), renamed the same way where that makes more keys match."""
    for old, new in renames.items():
        renamed = {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in state.items()}
        if len(wanted & renamed.keys()) > len(wanted & state.keys()):
            state = renamed
    return state


def _mismatch(missing: list[str], unexpected: list[str], shapes: list[str], state: Mapping, own: Mapping) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:SHOWN])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:SHOWN])})")
    if shapes:
        shown = ", ".join(f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in shapes[:SHOWN])
        parts.append(f"{len(shapes)} of another shape (e.g. {shown})")
    return "; ".join(parts)


def brief_error(error: BaseException, limit: int = 160) -> str:
    """The first line of an error's message, or its class name; a long one ends at the last sentence or
    word that fits in `limit` characters, marked "..." (never cut mid-word)."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    text = lines[0]
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind("; "))
    return (cut[: end + 1] if end > limit // 2 else cut.rsplit(" ", 1)[0].rstrip(",;:")) + " ..."
