"""Digit scenes: segmentation data composed of real handwritten digits, for offline runs and the bars.

A scene is a dark canvas with a few digits pasted at random places; each pixel's label is the class of
the digit whose ink covers it (digit d is class d + 1) or background (class 0). `digit_scenes` composes
scikit-learn's 1,797 digits (shipped with it: works offline), `mnist_scenes` the MNIST digits read by
torchvision's MNIST class. The training scenes use the training digits only and the test scenes the
test digits only, so no test digit was ever seen in training. Scenes are deterministic in `scene_seed`.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F

from kd_cli.data.base import DataSplits, SplitSeed, TensorSplit, register_dataset, tensor_splits
from kd_cli.data.digits import digits
from kd_cli.errors import KdError
from kd_cli.registry import OpenFraction, Range

SceneCount = Annotated[int, Range(1, 1_000_000)]
CanvasSide = Annotated[int, Range(8, 1024)]
DigitScale = Annotated[float, Range(0.25, 16)]
DigitsPerScene = Annotated[int, Range(1, 64)]
INK = 64  # a digit pixel at least this bright (of 255) is labelled with the digit; fainter ones are background
CLASS_NAMES = ["background", *(str(d) for d in range(10))]


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
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(digit_labels), size=(count, per_scene))
    tops = rng.integers(0, canvas - side + 1, size=(count, per_scene))
    lefts = rng.integers(0, canvas - side + 1, size=(count, per_scene))
    digits_np, labels_np = digit_images[:, 0].numpy(), digit_labels.numpy()
    images = np.zeros((count, canvas, canvas), dtype=np.uint8)
    masks = np.zeros((count, canvas, canvas), dtype=np.uint8)
    for scene in range(count):
        for k in range(per_scene):
            digit = digits_np[chosen[scene, k]]
            window = np.s_[scene, tops[scene, k] : tops[scene, k] + side, lefts[scene, k] : lefts[scene, k] + side]
            images[window] = np.maximum(images[window], digit)
            masks[window] = np.where(digit >= INK, labels_np[chosen[scene, k]] + 1, masks[window])
    return torch.from_numpy(images[:, None]), torch.from_numpy(masks)


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
