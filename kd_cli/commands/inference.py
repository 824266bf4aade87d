"""The model side of `kd predict` (kd_cli/predict.py): open a kd model or an exported ONNX file, give each
image the model's own evaluation preprocessing, and run the images through in batches."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import kd_cli.compress  # noqa: F401  (registers how a compressed model is rebuilt: kd_cli/saved_forms)
from kd_cli.engine.artifacts import (
    META,
    ModelSpec,
    load_model,
    load_spec,
    resolve_weights,
    spec_from_text,
)
from kd_cli.errors import KdError

log = logging.getLogger("kd")


# ------------------------------------------------------------------------------------------------ models


@dataclass
class Predictor:
    spec: ModelSpec
    # normalised images (CPU) -> logits (CPU, float32); a detector's: per image {boxes, scores, labels} (CPU)
    forward: Callable[[torch.Tensor], Any]
    source: str


def open_model(path: Path, device: str) -> Predictor:
    """A kd model (run directory or safetensors) on `device`, or an ONNX file in onnxruntime."""
    if path.suffix == ".onnx":
        return _onnx(path, device)
    if path.suffix in (".pt", ".pth", ".ts") and path.is_file():
        raise KdError(
            f"{path} is not a model kd predict reads (a kd run directory, its model.safetensors, or an ONNX file); "
            "a TorchScript file from kd export runs with torch.jit.load: export with format=onnx to predict with kd"
        )
    target = _device(device)
    model, spec = load_model(resolve_weights(path), target)
    model_device = next(iter(model.parameters()), torch.empty(0)).device
    if model_device.type != target.type:
        log.info(f"{path} holds int8 weights; it runs on the CPU")

    @torch.inference_mode()
    def forward(images: torch.Tensor) -> Any:
        outputs = model(images.to(model_device, non_blocking=True))
        if isinstance(outputs, list):  # a detector's boxes, scores and labels per image
            return [{key: value.cpu() for key, value in found.items()} for found in outputs]
        return outputs.float().cpu()

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
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if _device(device).type == "cuda"
        else ["CPUExecutionProvider"]
    )
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own classes for a bad file
        raise KdError(f"onnxruntime cannot load {path} ({str(error).splitlines()[0][:160]})") from None
    spec = _onnx_spec(path, session.get_modelmeta().custom_metadata_map.get(META))
    from kd_cli.models import model_task

    if model_task(spec.arch) == "detection":
        return _onnx_detector(path, session, spec)
    _check_onnx_shapes(path, session, spec)
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]

    def run(batch: torch.Tensor) -> torch.Tensor:
        try:
            return torch.from_numpy(session.run(None, {name: batch.numpy()})[0]).float()
        except Exception as error:  # noqa: BLE001 - onnxruntime's own classes; the file does not fit its description
            raise KdError(
                f"onnxruntime cannot run {path} on images of shape {list(batch.shape[1:])} as its model "
                f"description says ({str(error).splitlines()[0][:160]})"
            ) from None

    def forward(images: torch.Tensor) -> torch.Tensor:
        if isinstance(fixed, int) and fixed != len(images):  # a fixed-batch export: one batch at a time
            return torch.cat([forward_fixed(chunk) for chunk in images.split(fixed)])[: len(images)]
        return run(images)

    def forward_fixed(chunk: torch.Tensor) -> torch.Tensor:
        padded = (
            torch.cat([chunk, chunk[-1:].expand(fixed - len(chunk), *chunk.shape[1:])]) if len(chunk) < fixed else chunk
        )
        return run(padded)[: len(chunk)]

    return Predictor(spec, forward, str(path))


DETECTION_OUTPUTS = ("boxes", "scores", "labels")  # what kd export names a detector's outputs


def _onnx_detector(path: Path, session, spec: ModelSpec) -> Predictor:
    """A detector's ONNX file (kd export: one image per run, outputs boxes, scores, labels)."""
    inputs, outputs = session.get_inputs(), [output.name for output in session.get_outputs()]
    shape = inputs[0].shape
    if (
        outputs != list(DETECTION_OUTPUTS)
        or len(shape) != 4
        or list(shape[1:]) != [spec.in_channels, spec.input_size, spec.input_size]
    ):
        raise KdError(
            f"{path} takes {list(shape)} and gives {outputs}, but its model description says a detector of "
            f"{spec.in_channels}x{spec.input_size}x{spec.input_size} images (outputs {', '.join(DETECTION_OUTPUTS)}): "
            "they are not of one model; export it again with kd export"
        )
    name = inputs[0].name

    def forward(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        found = []
        for image in images.split(1):  # torchvision's exportable detectors take one image per run
            try:
                boxes, scores, labels = session.run(None, {name: image.numpy()})
            except Exception as error:  # noqa: BLE001 - onnxruntime's own classes
                raise KdError(f"onnxruntime cannot run {path} ({str(error).splitlines()[0][:160]})") from None
            found.append(
                {
                    "boxes": torch.from_numpy(boxes).float(),
                    "scores": torch.from_numpy(scores).float(),
                    "labels": torch.from_numpy(labels).long(),
                }
            )
        return found

    return Predictor(spec, forward, str(path))


# What decides how an image is fed and its outputs named: a model.json that differs in one of these
# belongs to another model.
FEEDING = ("num_classes", "class_names", "in_channels", "input_size", "mean", "std", "dataset")


def _onnx_spec(path: Path, embedded: str | None) -> ModelSpec:
    """The model.json `kd export` embedded in the file (the truth); one beside the file must agree with
    it. An ONNX file without one (written elsewhere) is read with the model.json beside it."""
    beside = path.with_name(META)
    if embedded is None:
        if not beside.is_file():
            raise KdError(
                f"{path} carries no kd model description and there is no {META} beside it: export it with "
                "kd export, or put the model.json of the model it was exported from beside it"
            )
        return load_spec(path)
    spec = spec_from_text(embedded, f"the {META} embedded in {path}")
    if beside.is_file():
        other = load_spec(path)
        differ = [key for key in FEEDING if getattr(spec, key) != getattr(other, key)]
        differ += ["crop_fraction"] * (spec.extra.get("crop_fraction") != other.extra.get("crop_fraction"))
        if differ:
            key = differ[0]
            raise KdError(
                f"{beside} disagrees with the {META} kd export embedded in {path} ({', '.join(differ)}; "
                f"{key}: {_value(other, key)} beside, {_value(spec, key)} embedded): it belongs to another "
                "model; remove or replace it"
            )
    return spec


def _value(spec: ModelSpec, key: str) -> str:
    value = spec.extra.get(key) if key == "crop_fraction" else getattr(spec, key)
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_onnx_shapes(path: Path, session, spec: ModelSpec) -> None:
    """The file's own input and output shapes (where fixed) against its model description."""
    expected = {1: spec.in_channels, 2: spec.input_size, 3: spec.input_size}
    shape = session.get_inputs()[0].shape
    wrong = [
        axis
        for axis, size in expected.items()
        if len(shape) == 4 and isinstance(shape[axis], int) and shape[axis] != size
    ]
    if len(shape) != 4 or wrong:
        raise KdError(
            f"{path} takes inputs of shape {list(shape)}, but its model description says "
            f"{spec.in_channels}x{spec.input_size}x{spec.input_size} images: they are not of one model"
        )
    outputs = session.get_outputs()[0].shape
    if len(outputs) == 2 and isinstance(outputs[1], int) and outputs[1] != spec.num_classes:
        raise KdError(
            f"{path} gives {outputs[1]} scores per image, but its model description lists "
            f"{spec.num_classes} classes: they are not of one model"
        )


def check_outputs(logits: torch.Tensor, model: Predictor, dims: int = 2) -> None:
    """Finite scores, one per class the model description lists (`dims`: 2 for a classifier's (B, classes),
    4 for a segmenter's (B, classes, H, W))."""
    if logits.dim() != dims or logits.shape[1] != model.spec.num_classes:
        raise KdError(
            f"{model.source} gives outputs of shape {list(logits.shape)} for a batch, but its model description "
            f"lists {model.spec.num_classes} classes: they are not of one model"
        )
    if not torch.isfinite(logits).all():
        raise KdError(f"{model.source} gives non-finite outputs (NaN or inf); its weights are broken: retrain it")


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
            check_outputs(logits, model)
            top = logits.softmax(1).topk(k, dim=1)
            for (path, _), probs, classes in zip(kept, top.values.tolist(), top.indices.tolist()):
                rows.append(
                    {"file": str(path), "classes": [model.spec.class_names[c] for c in classes], "probs": probs}
                )
    return rows, skipped


def _batches(files: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), size):
        yield files[start : start + size]
