"""`kd export` of a detector: ONNX through torchvision's exportable path, checked image by image.

torchvision's detectors end in data-dependent steps (score filtering, top-k per level, batched NMS) that
the torch.export-based exporter cannot trace (it stops at a guard on the number of boxes NMS keeps);
torchvision supports and tests their export with the TorchScript-based exporter (`dynamo=False`), one
image per run. So a detector's file takes one (1, C, S, S) normalised image and gives `boxes` (N, 4, in
the input's pixels), `scores` (N) and `labels` (N, 0..C-1, kd's classes), N varying per image.

The check runs every check image through both: the same number of boxes, the same labels, scores within
`tolerance` and box corners within `box_tolerance` pixels, or nothing is kept.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from kd_cli.engine.files import atomic_write
from kd_cli.errors import KdError
from kd_cli.stages.export_common import METADATA_KEY, exporter_output, first_line

OUTPUTS = ("boxes", "scores", "labels")  # the file's outputs, in this order (kd predict reads them by name)
INPUT_NAME = "input"
EXPORTER = "torch.onnx.export(dynamo=False): torchvision's exportable detection path"


class OneImage(nn.Module):
    """A kd detector as a function of one image: (1, C, S, S) -> boxes, scores, labels."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        found = self.detector(image)[0]
        return found["boxes"], found["scores"], found["labels"]


def check_options(cfg: DictConfig) -> None:
    if cfg.format != "onnx":
        raise KdError(
            f"format={cfg.format}: a detector is exported as ONNX (format=onnx), the path torchvision supports "
            "for its detectors"
        )


def write_checked(model: nn.Module, images: torch.Tensor, source: str, path: Path, cfg: DictConfig, meta: str) -> dict:
    """Export to a temporary file, run it on each image, and rename it to `path` only if it matches."""
    single = OneImage(model).eval()
    with torch.no_grad():
        expected = [single(image) for image in images.split(1)]
    result: dict = {}

    def write_and_check(tmp: Path) -> None:
        export(single, images[:1], tmp, cfg, meta)
        result.update(compare(tmp, images, expected))
        problem = disagreement(result, cfg)
        if problem:
            raise KdError(f"the exported file differs from PyTorch on {source}: {problem}; nothing was kept")

    atomic_write(path, write_and_check)
    return result


def export(single: OneImage, example: torch.Tensor, path: Path, cfg: DictConfig, meta: str) -> None:
    import onnx

    with exporter_output(), warnings.catch_warnings():
        # the TorchScript-based exporter warns that it is deprecated, and the tracer warns at each Python
        # number it records (image sizes, which are fixed here): the check below is what counts
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                single,
                (example,),
                str(path),
                dynamo=False,
                opset_version=cfg.opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUTS),
            )
        except Exception as error:  # the exporter's own classes
            raise KdError(
                f"ONNX export of the detector failed: {first_line(error)} (KD_DEBUG=1 shows the traceback)"
            ) from error
    written = onnx.load(str(path))
    written.metadata_props.add(key=METADATA_KEY, value=meta)
    onnx.save(written, str(path))


def compare(path: Path, images: torch.Tensor, expected: list[tuple[torch.Tensor, ...]]) -> dict:
    """Boxes, scores and labels of the file against PyTorch's, image by image."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    box_diff = score_diff = 0.0
    counts_differ = labels_differ = boxes = 0
    for image, (ref_boxes, ref_scores, ref_labels) in zip(images.split(1), expected):
        got_boxes, got_scores, got_labels = (
            torch.from_numpy(a) for a in session.run(list(OUTPUTS), {INPUT_NAME: image.numpy()})
        )
        boxes += len(ref_boxes)
        if len(got_boxes) != len(ref_boxes):
            counts_differ += 1
            continue
        labels_differ += int((got_labels.long() != ref_labels.long()).sum())
        if len(ref_boxes):
            box_diff = max(box_diff, _max_diff(got_boxes, ref_boxes))
            score_diff = max(score_diff, _max_diff(got_scores, ref_scores))
    return {
        "images_checked": len(images),
        "boxes_checked": boxes,
        "images_with_another_box_count": counts_differ,
        "labels_differing": labels_differ,
        "max_box_diff": box_diff,
        "max_abs_diff": score_diff,  # scores: the same key as a classifier's logits, for the summary's readers
    }


def _max_diff(got: torch.Tensor, reference: torch.Tensor) -> float:
    diff = (got.double() - reference.double()).abs().max().item()
    return math.inf if math.isnan(diff) else diff  # NaN must not pass


def disagreement(result: dict, cfg: DictConfig) -> str:
    if count := result["images_with_another_box_count"]:
        return f"{count} of {result['images_checked']} image(s) got another number of boxes"
    if result["labels_differing"]:
        return f"{result['labels_differing']} of {result['boxes_checked']} box(es) got another class"
    if result["max_box_diff"] > cfg.box_tolerance:
        return f"boxes differ by up to {result['max_box_diff']:.3g} pixels (box_tolerance={cfg.box_tolerance:g})"
    if result["max_abs_diff"] > cfg.tolerance:
        return f"scores differ by up to {result['max_abs_diff']:.3g} (tolerance={cfg.tolerance:g})"
    return ""
