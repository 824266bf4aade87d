"""`kd predict` with a segmentation model: one palette PNG mask per image, at the image's own size, in a
folder beside the CSV (`predictions.csv` -> `predictions_masks/`), and a CSV row per image with the share
of its pixels each class takes; with `overlay=true`, the image with its mask's colours over it
(`predictions_overlays/`).

The image is resized to the model's input size (its own preprocessing), the logits resized back to the
image's size (bilinear) before the argmax, so the mask lines up with the image pixel for pixel. The
palette is VOC's (class 0 black, 1 dark red, ...), the colours every segmentation viewer knows.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kd_cli.commands.inference import Predictor, check_outputs
from kd_cli.errors import KdError

OVERLAY_ALPHA = 0.5  # the mask's colour over the image, background (class 0) left as it is


def masks_folder(out: Path, overwrite: bool, kind: str = "masks") -> Path:
    """Where the masks (or overlays) go, checked before any work: a folder that holds files is kept unless
    `overwrite`."""
    folder = out.with_name(f"{out.stem}_{kind}")
    if folder.exists() and not folder.is_dir():
        raise KdError(f"{folder} (where the {kind} go, beside out={out}) is a file; choose another out=")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise KdError(f"{folder} (where the {kind} go) holds files; choose another out=, or pass overwrite=true")
    return folder


def overlay(image: torch.Tensor, mask: torch.Tensor, palette: list[int]) -> torch.Tensor:
    """uint8 (H, W, 3): the image with each non-background pixel blended half with its class's colour."""
    colours = torch.tensor(palette, dtype=torch.float32).reshape(-1, 3)[mask.long()]  # (H, W, 3)
    picture = image.permute(1, 2, 0).float()
    blended = torch.where((mask > 0)[..., None], (1 - OVERLAY_ALPHA) * picture + OVERLAY_ALPHA * colours, picture)
    return blended.round().clamp(0, 255).to(torch.uint8)


def voc_palette() -> list[int]:
    """VOC's colour map: class c's colour from the bits of c, spread over the high bits of R, G and B."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def predict_masks(
    model: Predictor,
    files: list[Path],
    transform: Callable,
    args: argparse.Namespace,
    folder: Path,
    overlays: Path | None = None,
) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Masks written for the readable files (rows: file, mask, class shares), and (file, problem) for the
    others; with `overlays`, each image with its mask's colours over it, there, as PNG."""
    from PIL import Image

    from kd_cli.data.images import UnreadableImage, decode_rgb

    folder.mkdir(parents=True, exist_ok=True)
    if overlays is not None:
        overlays.mkdir(parents=True, exist_ok=True)
    palette, used = voc_palette(), set[str]()
    rows: list[dict] = []
    skipped: list[tuple[Path, str]] = []
    for path in files:
        try:
            image = decode_rgb(str(path))
        except UnreadableImage as error:
            if args.strict:
                return rows, [(path, error.problem or str(error))]
            skipped.append((path, error.problem or str(error)))
            continue
        logits = model.forward(transform(image)[None])
        check_outputs(logits, model, dims=4)
        resized = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        mask = resized.argmax(1)[0].to(torch.uint8)
        picture = Image.fromarray(mask.numpy(), mode="P")
        picture.putpalette(palette)
        name = unique_name(path.stem, used)
        picture.save(folder / f"{name}.png")
        if overlays is not None:
            Image.fromarray(overlay(image, mask, palette).numpy()).save(overlays / f"{name}.png")
        shares = torch.bincount(mask.flatten().long(), minlength=model.spec.num_classes).double()
        rows.append(
            {"file": str(path), "mask": str(folder / f"{name}.png"), "shares": (100 * shares / shares.sum()).tolist()}
        )
    return rows, skipped


def unique_name(stem: str, used: set[str]) -> str:
    """The image's name for its mask; a second image of the same name gets `_2`, and so on."""
    name, count = stem, 1
    while name in used:
        count += 1
        name = f"{stem}_{count}"
    used.add(name)
    return name
