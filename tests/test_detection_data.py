"""Detection data (issue 24): boxes of the digit scenes, the embedded default's ground truth."""

from __future__ import annotations

import torch

from kd_cli.data import load_dataset
from kd_cli.data.scenes import compose_scenes, scale_digits, scene_boxes


def scaled_digits() -> tuple[torch.Tensor, torch.Tensor]:
    train = load_dataset({"name": "digits"}).train
    return scale_digits(train.images, 2.0), train.labels


def test_one_digit_per_scene_has_the_box_of_its_mask():
    digits, labels = scaled_digits()
    _, masks = compose_scenes(digits, labels, count=40, canvas=48, per_scene=1, seed=3)
    for mask, (boxes, classes) in zip(masks, scene_boxes(digits, labels, 40, 48, 1, 3), strict=True):
        rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
        assert boxes.tolist() == [[cols[0].item(), rows[0].item(), cols[-1].item() + 1, rows[-1].item() + 1]]
        assert classes.tolist() == [int(mask.max())]


def test_every_labelled_pixel_of_a_crowded_scene_lies_in_a_box_of_its_class():
    digits, labels = scaled_digits()
    _, masks = compose_scenes(digits, labels, count=30, canvas=48, per_scene=4, seed=7)
    scenes = scene_boxes(digits, labels, 30, 48, 4, 7)
    again = scene_boxes(digits, labels, 30, 48, 4, 7)  # deterministic in the seed
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(scenes, again, strict=True))
    for mask, (boxes, classes) in zip(masks, scenes, strict=True):
        assert len(boxes) == 4 and (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 48).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        for y, x in torch.nonzero(mask):
            c = int(mask[y, x])
            inside = (boxes[:, 0] <= x) & (x < boxes[:, 2]) & (boxes[:, 1] <= y) & (y < boxes[:, 3])
            assert (inside & (classes == c)).any(), (int(y), int(x), c)
