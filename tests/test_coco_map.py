"""COCO box AP (kd_cli/tasks/coco_map.py): pycocotools' numbers, hand-made cases, ids with gaps."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from kd_cli.errors import KdError
from kd_cli.tasks.coco_map import ImageBoxes, coco_evaluate, coco_map, ground_truth, results

pytest.importorskip("pycocotools")

NAMES = ["zero", "one", "two"]
GAPPY_IDS = [1, 3, 7]  # a COCO file's ids: not 0..C-1


def image(image_id: int, boxes: list[list[float]], labels: list[int], scores: list[float] | None = None, **kw):
    return ImageBoxes(
        image_id,
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
        None if scores is None else torch.tensor(scores),
        width=100,
        height=100,
        **kw,
    )


TRUTH = [
    image(10, [[10, 10, 50, 50], [60, 60, 90, 95]], [0, 2]),
    image(11, [[5, 5, 40, 30]], [1]),
    image(12, [], []),  # an image without boxes stays in the set
]


def test_ground_truth_fed_back_as_predictions_scores_ap_one():
    perfect = [image(t.image_id, t.boxes.tolist(), t.labels.tolist(), [1.0] * len(t.labels)) for t in TRUTH]
    scores = coco_map(TRUTH, perfect, GAPPY_IDS, NAMES)
    assert scores.stats["map"] == pytest.approx(1.0) and scores.stats["map50"] == pytest.approx(1.0)
    assert scores.per_class_ap == pytest.approx([1.0, 1.0, 1.0])


def test_one_box_at_iou_0_6_counts_at_three_of_the_ten_thresholds():
    """IoU 0.6 is a hit at 0.50, 0.55 and 0.60 and a miss at 0.65..0.95: AP = 3/10, AP50 = 1, AP75 = 0."""
    truth = [image(1, [[0, 0, 10, 10]], [0])]
    # shift the 10x10 box right by d: IoU = (10-d)/(10+d) = 0.6 at d = 2.5
    guess = [image(1, [[2.5, 0, 12.5, 10]], [0], [0.9])]
    stats = coco_map(truth, guess, [1], ["zero"]).stats
    assert stats["map50"] == pytest.approx(1.0) and stats["map75"] == pytest.approx(0.0)
    assert stats["map"] == pytest.approx(0.3)


def test_a_confident_false_positive_lowers_ap_and_a_wrong_class_is_no_hit():
    truth = [image(1, [[0, 0, 10, 10]], [0]), image(2, [[0, 0, 10, 10]], [0])]
    hit = [[0, 0, 10, 10]]
    ranked_first_wrong = [image(1, [[50, 50, 60, 60], *hit], [0, 0], [0.99, 0.5]), image(2, hit, [0], [0.4])]
    stats = coco_map(truth, ranked_first_wrong, [1], ["zero"]).stats
    # ranked: FP (p=0), TP (recall .5, p=.5), TP (recall 1, p=2/3); interpolated precision 2/3 at every recall
    assert stats["map50"] == pytest.approx(2 / 3, abs=0.01)
    wrong_class = [image(1, hit, [1], [0.9]), image(2, hit, [1], [0.9])]
    assert coco_map(truth, wrong_class, [1, 2], ["zero", "one"]).stats["map50"] == pytest.approx(0.0)


def test_a_crowd_region_is_neither_a_miss_nor_a_false_positive():
    truth = [image(1, [[0, 0, 10, 10], [40, 40, 90, 90]], [0, 0], crowd=torch.tensor([False, True]))]
    guess = [image(1, [[0, 0, 10, 10], [45, 45, 85, 85]], [0, 0], [0.9, 0.95])]
    assert coco_map(truth, guess, [1], ["zero"]).stats["map"] == pytest.approx(1.0)


def test_nothing_predicted_scores_zero():
    scores = coco_map(TRUTH, [], GAPPY_IDS, NAMES)
    assert scores.stats["map"] == 0.0 and scores.per_class_ap == [0.0, 0.0, 0.0]


def test_equal_to_cocoeval_on_the_files_written_to_disk_and_ids_round_trip(tmp_path):
    """The annotations and the results kd writes, read back by pycocotools from disk, give the same AP;
    the results carry the file's own category ids (1, 3, 7), not kd's labels."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    torch.manual_seed(0)
    guesses = []
    for t in TRUTH:
        noisy = t.boxes + torch.randn_like(t.boxes) * 3
        extra = torch.tensor([[20.0, 20.0, 45.0, 60.0]])
        guesses.append(
            ImageBoxes(
                t.image_id,
                torch.cat([noisy, extra]),
                torch.cat([t.labels, torch.tensor([1])]),
                torch.rand(len(t.labels) + 1),
            )
        )
    truth = ground_truth(TRUTH, GAPPY_IDS, NAMES)
    detections = results(guesses, GAPPY_IDS)
    assert {d["category_id"] for d in detections} <= set(GAPPY_IDS)
    (tmp_path / "instances.json").write_text(json.dumps(truth))
    (tmp_path / "results.json").write_text(json.dumps(detections))
    gt = COCO(str(tmp_path / "instances.json"))
    evaluation = COCOeval(gt, gt.loadRes(str(tmp_path / "results.json")), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    ours = coco_evaluate(truth, detections).stats
    assert list(ours.values()) == pytest.approx(list(evaluation.stats), abs=1e-4)
    assert 0 < ours["map"] < 1 and not math.isnan(ours["map50"])


@pytest.mark.parametrize(
    "guess, fragment",
    [
        (image(10, [[float("nan"), 10, 50, 50]], [0], [0.9]), "not finite"),
        (image(10, [[10, 10, 50, 50]], [0], [float("nan")]), "scores must be 1 finite numbers"),
        (image(10, [[10, 10, 50, 50]], [-1], [0.9]), "labels must be whole numbers in 0..2"),
        (image(10, [[10, 10, 50, 50]], [3], [0.9]), "labels must be whole numbers in 0..2"),
        (image(99, [[10, 10, 50, 50]], [0], [0.9]), "image id 99, which the ground truth does not list"),
        (ImageBoxes(10, torch.zeros(1, 4), torch.tensor([0, 0]), torch.ones(2)), "boxes of shape (1, 4) for 2 labels"),
    ],
)
def test_predictions_that_cocoeval_would_misscore_are_refused(guess, fragment):
    with pytest.raises(KdError, match=re.escape(fragment)):
        coco_map(TRUTH, [guess], GAPPY_IDS, NAMES)


def test_no_predictions_score_as_cocoeval_scores_misses():
    """-1 where there is nothing to score (no large objects here), as with predictions present."""
    empty = coco_map(TRUTH, [], GAPPY_IDS, NAMES).stats
    some = coco_map(TRUTH, [image(11, [[5, 5, 40, 30]], [1], [0.9])], GAPPY_IDS, NAMES).stats
    assert empty["map"] == 0.0 and empty["map_large"] == some["map_large"] == -1.0


def test_voc_ap50_follows_the_devkits_rules_on_hand_made_cases():
    from kd_cli.tasks.voc_ap import area_under_envelope, voc_ap50

    truth = [
        ImageBoxes(1, torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), torch.tensor([0, 0])),
        ImageBoxes(
            2,
            torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]),
            torch.tensor([0, 1]),
            crowd=torch.tensor([False, True]),
        ),
    ]
    predictions = [
        # best first: a hit, a duplicate of it (a miss), a box on nothing (a miss), then the other two hits
        ImageBoxes(
            1,
            torch.tensor(
                [[0.0, 0.0, 10.0, 10.0], [0.5, 0.0, 10.0, 10.0], [40.0, 40.0, 45.0, 45.0], [20.0, 20.0, 30.0, 31.0]]
            ),
            torch.tensor([0, 0, 0, 0]),
            scores=torch.tensor([0.9, 0.8, 0.7, 0.6]),
        ),
        ImageBoxes(
            2,
            torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]),
            torch.tensor([0, 1]),
            scores=torch.tensor([0.5, 0.95]),
        ),
    ]
    mean, per_class = voc_ap50(truth, predictions, 3)
    # class 0: hits at ranks 1, 4, 5 of 3 boxes: precision 1, 1/2, 1/3, 1/2, 3/5 -> envelope 1 to recall 1/3,
    # then 3/5 to recall 1: AP = 1/3 + 2/3 * 3/5 = 0.7333...
    assert per_class[0] == pytest.approx(100 * (1 / 3 + 2 / 3 * 3 / 5))
    # class 1: its only box is difficult: no AP, left out of the mean (the detection on it counts neither way)
    assert per_class[1] != per_class[1] and per_class[2] != per_class[2]
    assert mean == pytest.approx(per_class[0])
    assert area_under_envelope([1, 1], 2) == 1.0 and area_under_envelope([0, 1], 1) == 0.5
    assert area_under_envelope([], 4) == 0.0
    perfect = [ImageBoxes(t.image_id, t.boxes, t.labels, scores=torch.ones(len(t.labels))) for t in truth]
    assert voc_ap50(truth, perfect, 3)[0] == pytest.approx(100.0)
