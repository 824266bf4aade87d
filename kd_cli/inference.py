"""The model side of `kd predict` (kd_cli/predict.py): open a kd model or an exported ONNX file, give each
image the model's own evaluation preprocessing, and run the images through in batches."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

import kd_cli.compress  # noqa: F401  (registers how a compressed model is rebuilt: kd_cli/saved_forms)
from kd_cli.engine.artifacts import (
    META,
    ModelSpec,
    load_model,
    load_spec,
    resolve_weights,
)
from kd_cli.errors import KdError

log = logging.getLogger("kd")


# ------------------------------------------------------------------------------------------------ models


@dataclass
class Predictor:
    spec: ModelSpec
    forward: Callable[[torch.Tensor], torch.Tensor]  # normalised images (CPU) -> logits (CPU, float32)
    source: str


def open_model(path: Path, device: str) -> Predictor:
    """A kd model (run directory or safetensors) on `device`, or an ONNX file in onnxruntime."""
    if path.suffix == ".onnx":
        return _onnx(path, device)
    target = _device(device)
    model, spec = load_model(resolve_weights(path), target)
    model_device = next(iter(model.parameters()), torch.empty(0)).device
    if model_device.type != target.type:
        log.info(f"{path} holds int8 weights; it runs on the CPU")

    @torch.inference_mode()
    def forward(images: torch.Tensor) -> torch.Tensor:
        return model(images.to(model_device, non_blocking=True)).float().cpu()

    return Predictor(spec, forward, str(path))


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdError(f"device={name} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdError("device=cuda but no CUDA GPU is visible here; use device=cpu")
    if device.type not in ("cpu", "cuda"):
        raise KdError(f"device={name}: kd predict runs on cpu or cuda")
    return device


def _onnx(path: Path, device: str) -> Predictor:
    try:
        import onnxruntime as ort
    except ImportError:
        raise KdError("kd predict on an ONNX file needs onnxruntime: pip install onnxruntime") from None
    if not path.is_file():
        raise KdError(f"{path} does not exist; give a model.onnx written by kd export")
    meta = path.with_name(META)
    if not meta.is_file():
        raise KdError(f"no {META} beside {path}: kd export writes one there (input size, normalisation, classes)")
    spec = load_spec(path)  # the model.json beside it, as beside a model.safetensors
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if _device(device).type == "cuda"
        else ["CPUExecutionProvider"]
    )
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own classes for a bad file
        raise KdError(f"onnxruntime cannot load {path} ({str(error).splitlines()[0][:160]})") from None
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]

    def forward(images: torch.Tensor) -> torch.Tensor:
        if isinstance(fixed, int) and fixed != len(images):  # a fixed-batch export: one batch at a time
            return torch.cat([forward_fixed(chunk) for chunk in images.split(fixed)])[: len(images)]
        return torch.from_numpy(session.run(None, {name: images.numpy()})[0]).float()

    def forward_fixed(chunk: torch.Tensor) -> torch.Tensor:
        padded = (
            torch.cat([chunk, chunk[-1:].expand(fixed - len(chunk), *chunk.shape[1:])]) if len(chunk) < fixed else chunk
        )
        return torch.from_numpy(session.run(None, {name: padded.numpy()})[0]).float()[: len(chunk)]

    return Predictor(spec, forward, str(path))


# ------------------------------------------------------------------------------------------ preprocessing


def preprocessing(spec: ModelSpec) -> Callable:
    """The model's own evaluation transform: uint8 RGB image tensor -> normalised float tensor (C, S, S)."""
    from torchvision.transforms import v2

    from kd_cli.data.loader import centre_crop

    size = spec.input_size
    if spec.dataset == "imagefolder":  # as kd evaluated it: resize to size / crop_fraction, keep the centre
        frame = centre_crop(size, spec.extra.get("crop_fraction", 0.875))
    else:  # the small in-memory sets saw whole images at their own size
        frame = [v2.Resize((size, size), antialias=True)]
    from kd_cli.data.images import grey

    luma = [grey] if spec.in_channels == 1 else []
    return v2.Compose(
        [
            v2.ToImage(),
            *luma,
            *frame,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(spec.mean), list(spec.std)),
        ]
    )


def read_image(path: Path, transform: Callable) -> torch.Tensor:
    """One input file through kd's one decoding path (the pixels training and evaluation saw), then
    the model's transform; any failure is an UnreadableImage naming the file."""
    from kd_cli.data.images import decode_rgb

    return transform(decode_rgb(str(path)))


def predict_files(
    model: Predictor, files: list[Path], transform: Callable, args: argparse.Namespace
) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Top-k rows for the readable files, and (file, problem) for the others."""
    from kd_cli.data.images import UnreadableImage

    rows: list[dict] = []
    skipped: list[tuple[Path, str]] = []
    k = min(args.top_k, model.spec.num_classes)

    def load(path: Path) -> torch.Tensor | str:
        try:
            return read_image(path, transform)
        except UnreadableImage as error:
            return error.problem or str(error)

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for batch in _batches(files, args.batch_size):
            loaded = list(pool.map(load, batch))
            if args.strict and any(isinstance(item, str) for item in loaded):
                bad = next((path, item) for path, item in zip(batch, loaded) if isinstance(item, str))
                return rows, [bad]
            kept = [(path, item) for path, item in zip(batch, loaded) if not isinstance(item, str)]
            skipped += [(path, item) for path, item in zip(batch, loaded) if isinstance(item, str)]
            if not kept:
                continue
            logits = model.forward(torch.stack([image for _, image in kept]))
            _check_finite(logits, model.source)
            top = logits.softmax(1).topk(k, dim=1)
            for (path, _), probs, classes in zip(kept, top.values.tolist(), top.indices.tolist()):
                rows.append(
                    {"file": str(path), "classes": [model.spec.class_names[c] for c in classes], "probs": probs}
                )
    return rows, skipped


def _batches(files: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), size):
        yield files[start : start + size]


def _check_finite(logits: torch.Tensor, source: str) -> None:
    if not torch.isfinite(logits).all():
        raise KdError(f"{source} gives non-finite outputs (NaN or inf); its weights are broken: retrain it")
