"""Digit scenes: segmentation and detection data composed of real handwritten digits, for offline runs
and the bars.

A scene is a dark canvas with a few digits pasted at random places; each pixel's label is the class of
the digit whose ink covers it (digit d is class d + 1) or background (class 0). `digit_scenes` composes
scikit-learn's 1,797 digits (shipped with it: works offline), `mnist_scenes` the MNIST digits read by
torchvision's MNIST class. The training scenes use the training digits only and the test scenes the
test digits only, so no test digit was ever seen in training. Scenes are deterministic in `scene_seed`.
`digit_detection` and `mnist_detection` are the same scenes labelled with a box around each digit's ink.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F

from kd_cli.data.base import BoxSplit, DataSplits, SplitSeed, TensorSplit, register_dataset, tensor_splits
from kd_cli.data.digits import digits
from kd_cli.errors import KdError
from kd_cli.registry import OpenFraction, Range

SceneCount = Annotated[int, Range(1, 1_000_000)]
CanvasSide = Annotated[int, Range(8, 1024)]
DigitScale = Annotated[float, Range(0.25, 16)]
DigitsPerScene = Annotated[int, Range(1, 64)]
INK = 64  # a digit pixel at least this bright (of 255) is labelled with the digit; fainter ones are background
CLASS_NAMES = ["background", *(str(d) for d in range(10))]
DIGIT_NAMES = [str(d) for d in range(10)]  # detection has no background class


@dataclass(frozen=True)
class Placements:
    """Where a set of scenes puts its digits: for scene s and slot k, digit `chosen[s, k]` of the source
    with its top-left corner at (`tops[s, k]`, `lefts[s, k]`)."""

    chosen: np.ndarray
    tops: np.ndarray
    lefts: np.ndarray


def place_digits(available: int, count: int, canvas: int, side: int, per_scene: int, seed: int) -> Placements:
    """`count` scenes of `per_scene` digits drawn (with replacement) from `available`, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, available, size=(count, per_scene))
    tops = rng.integers(0, canvas - side + 1, size=(count, per_scene))
    lefts = rng.integers(0, canvas - side + 1, size=(count, per_scene))
    return Placements(chosen, tops, lefts)


def compose_scenes(
    digit_images: torch.Tensor,
    digit_labels: torch.Tensor,
    count: int,
    canvas: int,
    per_scene: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` scenes of `per_scene` digits each, drawn (with replacement) from uint8 digits (N, 1, h, w)
    with labels (N,): uint8 images (count, 1, canvas, canvas) and masks (count, canvas, canvas). A digit
    pasted over another shows the brighter ink of the two and takes the pixels its own ink covers."""
    side = digit_images.shape[-1]
    placed = place_digits(len(digit_labels), count, canvas, side, per_scene, seed)
    digits_np, labels_np = digit_images[:, 0].numpy(), digit_labels.numpy()
    images = np.zeros((count, canvas, canvas), dtype=np.uint8)
    masks = np.zeros((count, canvas, canvas), dtype=np.uint8)
    for scene in range(count):
        for k in range(per_scene):
            top, left, index = placed.tops[scene, k], placed.lefts[scene, k], placed.chosen[scene, k]
            digit = digits_np[index]
            window = np.s_[scene, top : top + side, left : left + side]
            images[window] = np.maximum(images[window], digit)
            masks[window] = np.where(digit >= INK, labels_np[index] + 1, masks[window])
    return torch.from_numpy(images[:, None]), torch.from_numpy(masks)


def scene_boxes(
    digit_images: torch.Tensor, digit_labels: torch.Tensor, count: int, canvas: int, per_scene: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The boxes of the scenes `compose_scenes` makes from the same arguments: per scene, (k, 4) float
    boxes x1 y1 x2 y2 in canvas pixels around each pasted digit's ink (pixels >= INK; x2, y2 one past the
    last inked column and row, so width = x2 - x1) and their labels (digit d is label d: detection has
    no background class, and coco_map numbers labels from 0). A digit
    partly hidden by one pasted later keeps its whole box, as a person would draw it; a digit without
    ink at that threshold has no box."""
    side = digit_images.shape[-1]
    placed = place_digits(len(digit_labels), count, canvas, side, per_scene, seed)
    extents = [_ink_extent(digit) for digit in (digit_images[:, 0] >= INK).numpy()]
    scenes = []
    for scene in range(count):
        boxes, labels = [], []
        for k in range(per_scene):
            index = placed.chosen[scene, k]
            if extents[index] is None:
                continue
            y1, y2, x1, x2 = extents[index]
            top, left = placed.tops[scene, k], placed.lefts[scene, k]
            boxes.append([left + x1, top + y1, left + x2, top + y2])
            labels.append(int(digit_labels[index]))
        scenes.append(
            (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64))
        )
    return scenes


def _ink_extent(ink: np.ndarray) -> tuple[int, int, int, int] | None:
    """(first row, last row + 1, first column, last column + 1) of a boolean ink map; None if it has none."""
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def scale_digits(images: torch.Tensor, scale: float) -> torch.Tensor:
    """uint8 digits resized by `scale` (bilinear; antialiased when shrinking)."""
    if scale == 1:
        return images
    side = max(1, round(images.shape[-1] * scale))
    resized = F.interpolate(
        images.float(), size=(side, side), mode="bilinear", antialias=scale < 1, align_corners=False
    )
    return resized.round().clamp(0, 255).to(torch.uint8)


def scene_splits(
    source: DataSplits,
    title: str,
    train_scenes: int,
    test_scenes: int,
    canvas: int,
    digits_per_scene: int,
    digit_scale: float,
    scene_seed: int,
) -> DataSplits:
    """Training scenes from `source`'s training digits, test scenes from its test digits."""
    assert isinstance(source.train, TensorSplit) and isinstance(source.test, TensorSplit)
    side = max(1, round(source.input_size * digit_scale))
    if side > canvas:
        raise KdError(
            f"dataset={title}: digits scaled to {side}x{side} px do not fit a {canvas}x{canvas} canvas; raise "
            f"dataset.canvas to at least {side} or lower dataset.digit_scale"
        )
    splits = []
    for split, count, stream in ((source.train, train_scenes, 0), (source.test, test_scenes, 1)):
        images, masks = compose_scenes(
            scale_digits(split.images, digit_scale),
            split.labels,
            count,
            canvas,
            digits_per_scene,
            scene_seed * 2 + stream,
        )
        splits.append(TensorSplit(images, masks))
    return tensor_splits(splits[0], splits[1], CLASS_NAMES, title, source.fingerprint, task="segmentation")


def box_scene_splits(
    source: DataSplits,
    title: str,
    train_scenes: int,
    test_scenes: int,
    canvas: int,
    digits_per_scene: int,
    digit_scale: float,
    scene_seed: int,
) -> DataSplits:
    """`scene_splits`' scenes (the same pixels) with each digit's box instead of the masks."""
    scenes = scene_splits(source, title, train_scenes, test_scenes, canvas, digits_per_scene, digit_scale, scene_seed)
    assert isinstance(source.train, TensorSplit) and isinstance(source.test, TensorSplit)
    splits = []
    for split, scene_split, stream in ((source.train, scenes.train, 0), (source.test, scenes.test, 1)):
        assert isinstance(scene_split, TensorSplit)
        count = len(scene_split)
        digits = scale_digits(split.images, digit_scale)
        boxed = scene_boxes(digits, split.labels, count, canvas, digits_per_scene, scene_seed * 2 + stream)
        splits.append(
            BoxSplit(scene_split.images, [b for b, _ in boxed], [lab for _, lab in boxed], list(range(count)))
        )
    return tensor_splits(splits[0], splits[1], DIGIT_NAMES, title, source.fingerprint, task="detection")


@register_dataset("digit_scenes")
def digit_scenes(
    root: str | None = None,
    download: bool = False,
    train_scenes: SceneCount = 1000,
    test_scenes: SceneCount = 300,
    canvas: CanvasSide = 48,
    digits_per_scene: DigitsPerScene = 3,
    digit_scale: DigitScale = 2.0,
    scene_seed: SplitSeed = 0,
    test_fraction: OpenFraction = 0.3,
    split_seed: SplitSeed = 0,
) -> DataSplits:
    """scikit-learn's digits (8x8, scaled by `digit_scale`) on a `canvas`-pixel square, split first by
    `test_fraction`/`split_seed` as dataset=digits is. `root` and `download` are unused."""
    source = digits(root, download, test_fraction, split_seed)
    return scene_splits(
        source, "digit_scenes", train_scenes, test_scenes, canvas, digits_per_scene, digit_scale, scene_seed
    )


@register_dataset("mnist_scenes")
def mnist_scenes(
    root: str = "data",
    download: bool = False,
    train_scenes: SceneCount = 10000,
    test_scenes: SceneCount = 2000,
    canvas: CanvasSide = 64,
    digits_per_scene: DigitsPerScene = 3,
    digit_scale: DigitScale = 1.0,
    scene_seed: SplitSeed = 0,
) -> DataSplits:
    """MNIST (torchvision's MNIST class under `root`, downloaded with `download`) composed into scenes."""
    from kd_cli.data.torchvision_sets import mnist

    return scene_splits(
        mnist(root, download),
        "mnist_scenes",
        train_scenes,
        test_scenes,
        canvas,
        digits_per_scene,
        digit_scale,
        scene_seed,
    )


for _scenes in (digit_scenes, mnist_scenes):
    _scenes.task = "segmentation"  # type: ignore[attr-defined]  # read by data.base.dataset_task
    _scenes.image_channels = 1  # type: ignore[attr-defined]  # read by base.expected_channels


@register_dataset("digit_detection")
def digit_detection(
    root: str | None = None,
    download: bool = False,
    train_scenes: SceneCount = 1000,
    test_scenes: SceneCount = 300,
    canvas: CanvasSide = 48,
    digits_per_scene: DigitsPerScene = 3,
    digit_scale: DigitScale = 2.0,
    scene_seed: SplitSeed = 0,
    test_fraction: OpenFraction = 0.3,
    split_seed: SplitSeed = 0,
) -> DataSplits:
    """dataset=digit_scenes' scenes with a box per digit (labels 0..9). `root` and `download` are unused."""
    source = digits(root, download, test_fraction, split_seed)
    return box_scene_splits(
        source, "digit_detection", train_scenes, test_scenes, canvas, digits_per_scene, digit_scale, scene_seed
    )


@register_dataset("mnist_detection")
def mnist_detection(
    root: str = "data",
    download: bool = False,
    train_scenes: SceneCount = 10000,
    test_scenes: SceneCount = 2000,
    canvas: CanvasSide = 64,
    digits_per_scene: DigitsPerScene = 3,
    digit_scale: DigitScale = 1.0,
    scene_seed: SplitSeed = 0,
) -> DataSplits:
    """dataset=mnist_scenes' scenes with a box per digit (labels 0..9)."""
    from kd_cli.data.torchvision_sets import mnist

    return box_scene_splits(
        mnist(root, download),
        "mnist_detection",
        train_scenes,
        test_scenes,
        canvas,
        digits_per_scene,
        digit_scale,
        scene_seed,
    )


for _boxed in (digit_detection, mnist_detection):
    _boxed.task = "detection"  # type: ignore[attr-defined]
    _boxed.image_channels = 1  # type: ignore[attr-defined]
