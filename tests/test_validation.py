"""Honest model selection: a validation split chooses the best epoch, the test split is read once at the end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from kdrun import FAST, kd_here, summary
from PIL import Image
from safetensors.torch import load_file

from kd_cli.data import load_dataset
from kd_cli.data.base import split_labels
from kd_cli.data.loader import TensorLoader
from kd_cli.engine import loop
from kd_cli.errors import KdError

DIGITS = {"name": "digits", "test_fraction": 0.3, "split_seed": 0}


def test_val_fraction_holds_out_a_stratified_share_of_training_only():
    plain = load_dataset(DIGITS)
    held = load_dataset({**DIGITS, "val_fraction": 0.2})
    assert plain.val is None
    assert len(held.train) + len(held.val) == len(plain.train)
    assert torch.equal(held.test.images, plain.test.images)  # the test split is untouched
    per_class = torch.bincount(split_labels(plain.train), minlength=10)
    held_out = torch.bincount(held.val.labels, minlength=10)
    assert torch.all((held_out - 0.2 * per_class).abs() <= 1)  # each class gives its share
    # disjoint: every training image is in exactly one of the two
    rows = lambda split: {bytes(image.numpy()) for image in split.images}  # noqa: E731
    assert not rows(held.train) & rows(held.val)
    assert len(rows(held.train) | rows(held.val)) == len(rows(plain.train))
    again = load_dataset({**DIGITS, "val_fraction": 0.2})
    assert torch.equal(again.val.images, held.val.images) and again.fingerprint == held.fingerprint
    # a teacher found by fingerprint must have trained on this same smaller training split
    assert held.fingerprint != plain.fingerprint
    assert load_dataset({**DIGITS, "val_fraction": 0.2, "split_seed": 1}).fingerprint != held.fingerprint


@pytest.mark.parametrize("value", [1.0, -0.1, "a lot"])
def test_impossible_val_fraction_is_refused_before_loading(value):
    with pytest.raises(KdError, match="dataset.val_fraction"):
        load_dataset({**DIGITS, "val_fraction": value})


def write_folder(root: Path, per_class: int, offset: int = 0) -> None:
    for k, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (10, 10), (40 * k + i + offset, 100, 7 * i)).save(root / cls / f"{i}.png")


def test_image_folder_with_its_own_val_folder(tmp_path):
    write_folder(tmp_path / "train", 5)
    write_folder(tmp_path / "val", 2, offset=50)
    write_folder(tmp_path / "test", 3, offset=100)
    data = load_dataset({"name": "imagefolder", "root": str(tmp_path), "image_size": 8, "val_fraction": 0.5})
    assert (len(data.train), len(data.val), len(data.test)) == (10, 4, 6)  # val/ wins over val_fraction
    assert all("/val/" in path for path, _ in data.val.dataset.samples)


def test_a_class_with_one_training_image_stays_in_training(tmp_path):
    write_folder(tmp_path / "train", 1)
    write_folder(tmp_path / "test", 1, offset=100)
    with pytest.raises(KdError, match="holds out no image.*val_fraction=0"):
        load_dataset({"name": "imagefolder", "root": str(tmp_path), "image_size": 8, "val_fraction": 0.3})


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    """One teacher run with a validation split, every loader pass and epoch recorded in order."""
    outputs = tmp_path_factory.mktemp("outputs")
    events: list[tuple[str, int]] = []
    mp = pytest.MonkeyPatch()
    original_iter, original_epoch = TensorLoader.__iter__, loop._train_epoch

    def spy_iter(self):
        events.append(("train" if self.shuffle else "eval", self.num_samples))
        return original_iter(self)

    def spy_epoch(job, *args):
        events.append(("epoch", args[-3]))
        return original_epoch(job, *args)

    mp.setattr(TensorLoader, "__iter__", spy_iter)
    mp.setattr(loop, "_train_epoch", spy_epoch)
    run = outputs / "teacher"
    try:
        result = kd_here(
            "train-teacher",
            "trainer.epochs=6",
            "dataset.val_fraction=0.2",
            "optim.lr=0.3",
            *FAST,
            f"paths.outputs={outputs}",
            f"hydra.run.dir={run}",
            cwd=outputs,
        )
    finally:
        mp.undo()
    assert result.code == 0, result.stderr
    return run, events, result


def test_the_test_split_is_read_only_after_the_last_epoch(selected):
    run, events, _ = selected
    env = json.loads((run / "env.json").read_text())
    val_size, test_size = env["val_samples"], env["test_samples"]
    assert val_size > 0 and val_size != test_size
    last_epoch = max(i for i, (kind, _) in enumerate(events) if kind == "epoch")
    test_reads = [i for i, event in enumerate(events) if event == ("eval", test_size)]
    val_reads = [i for i, event in enumerate(events) if event == ("eval", val_size)]
    assert len(val_reads) == 6  # one per epoch
    assert test_reads and min(test_reads) > max(val_reads) > last_epoch  # never before training ended
    assert len(test_reads) <= 2  # the last weights, and the chosen epoch's if they differ


def test_best_epoch_is_chosen_on_validation_and_its_weights_are_saved(selected):
    run, _, result = selected
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert all("val_top1" in row and not row.get("test_top1") for row in rows)
    val = [float(row["val_top1"]) for row in rows]
    done = summary(run)
    assert done["selected_on"] == "val"
    assert done["best_epoch"] == val.index(max(val)) + 1 and done["best_val_top1"] == max(val)
    assert done["best_top1"] is not None and done["last_top1"] is not None
    assert "best epoch on validation" in result.stdout
    # the saved model is the chosen epoch's: scoring it on the test split gives the summary's best_top1
    scored = kd_here("evaluate", f"run={run}", *FAST, f"hydra.run.dir={run.parent / 'eval'}", cwd=run.parent)
    assert scored.code == 0, scored.stderr
    assert summary(run.parent / "eval")["top1"] == pytest.approx(done["best_top1"], abs=1e-6)
    on_val = kd_here(
        "evaluate", f"run={run}", "split=val", *FAST, f"hydra.run.dir={run.parent / 'eval-val'}", cwd=run.parent
    )
    assert on_val.code == 0, on_val.stderr
    assert summary(run.parent / "eval-val")["top1"] == pytest.approx(done["best_val_top1"], abs=1e-6)
    weights = load_file(run / "model.safetensors")
    checkpoint = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in checkpoint["best_state"].items() if k in weights)


def test_without_validation_the_best_is_named_a_test_set_number(tmp_path):
    run = tmp_path / "run"
    result = kd_here(
        "train-teacher", "trainer.epochs=1", *FAST, f"paths.outputs={tmp_path}", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert result.code == 0, result.stderr
    assert summary(run)["selected_on"] == "test" and summary(run)["best_val_top1"] is None
    assert "literature comparison" in result.stdout
