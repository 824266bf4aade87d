"""`kd predict`: a trained (or exported) model classifies image files; bad files are named, not fatal."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from formats import save_image, truncate
from kdrun import FAST, assert_one_line_error, kd, kd_here

from kd_cli.data import load_dataset
from kd_cli.engine.artifacts import load_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    outputs = tmp_path_factory.mktemp("outputs")
    run = outputs / "teacher"
    result = kd_here(
        "train-teacher", "trainer.epochs=2", *FAST, f"paths.outputs={outputs}", f"hydra.run.dir={run}", cwd=outputs
    )
    assert result.code == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The first 20 digits test images as 8x8 grey PNGs in class folders, plus their tensors."""
    root = tmp_path_factory.mktemp("pngs")
    test = load_dataset({"name": "digits"}).test
    images, labels = test.images[:20], test.labels[:20]
    for i, (image, label) in enumerate(zip(images, labels)):
        save_image(root / str(int(label)) / f"{i:02d}.png", image[0].numpy())
    return root, images, labels


def rows_of(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_predictions_are_the_models_own_on_the_same_pixels(trained, pngs, tmp_path):
    root, images, _ = pngs
    out = tmp_path / "p.csv"
    result = kd_here("predict", f"run={trained}", str(root), "top_k=3", f"out={out}", cwd=tmp_path)
    assert result.code == 0, result.stderr
    rows = rows_of(out)
    assert len(rows) == 20 and list(rows[0]) == ["file", "class1", "prob1", "class2", "prob2", "class3", "prob3"]
    model, spec = load_model(trained)
    x = (images.float() / 255 - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        probs = model(x).softmax(1)
    files = sorted(root.rglob("*.png"))
    by_index = {int(Path(row["file"]).stem): row for row in rows}
    assert [Path(row["file"]) for row in rows] == files  # folders in sorted order
    for i, row in by_index.items():
        top = probs[i].topk(3)
        assert [row[f"class{k}"] for k in (1, 2, 3)] == [spec.class_names[c] for c in top.indices.tolist()]
        assert float(row["prob1"]) == pytest.approx(top.values[0].item(), abs=1e-5)
    assert "kd predict: 20 image(s)" in result.stdout and str(out) in result.stdout


def test_an_unreadable_image_is_named_and_skipped(trained, pngs, tmp_path):
    root, _, _ = pngs
    folder = tmp_path / "mixed"
    for i, path in enumerate(sorted(root.rglob("*.png"))[:6]):
        (folder / f"{i}.png").parent.mkdir(exist_ok=True)
        (folder / f"{i}.png").write_bytes(path.read_bytes())
    truncate(folder / "2.png", keep=0.4)
    (folder / "4.png").write_text("not an image")
    out = tmp_path / "p.csv"
    result = kd_here("predict", f"run={trained}", str(folder), f"out={out}", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert [Path(row["file"]).name for row in rows_of(out)] == ["0.png", "1.png", "3.png", "5.png"]
    warning = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("kd: warning: skipped 2 unreadable image(s) of 6")
    assert "2.png" in warning[0] and "4.png" in warning[0]

    strict = tmp_path / "strict.csv"
    refused = kd_here("predict", f"run={trained}", str(folder), f"out={strict}", "strict=true", cwd=tmp_path)
    assert_one_line_error(refused, "2.png", "strict=true")
    assert not strict.exists()


def test_single_images_and_list_files(trained, pngs, tmp_path):
    root, _, _ = pngs
    files = sorted(root.rglob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text(
        "# two digits, one by a path relative to the list\n"
        + "\n".join([os.path.relpath(files[3], tmp_path), str(files[4])])
    )
    out = tmp_path / "p.csv"
    result = kd_here(
        "predict",
        f"run={trained / 'model.safetensors'}",
        str(files[0]),
        str(listing),
        f"out={out}",
        "top_k=20",
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr
    rows = rows_of(out)
    assert [Path(r["file"]).resolve() for r in rows] == [p.resolve() for p in (files[0], *files[3:5])]
    assert "class10" in rows[0] and "class11" not in rows[0]  # top_k is capped at the class count
    assert sum(float(rows[0][f"prob{k}"]) for k in range(1, 11)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["top_k=0"], ["top_k", "at least 1"]),
        (["workers=100000000000"], ["--workers", "at most 256"]),
        (["batch_size=100000000000"], ["batch_size", "at most 65536"]),
        (["topk=3"], ["unknown option 'topk'"]),
        (["device=cuda"] if not torch.cuda.is_available() else ["device=tpu"], ["device="]),
        (["strict=maybe"], ["'maybe' is not true or false"]),
    ],
)
def test_bad_options_are_one_line(trained, pngs, tmp_path, args, fragments):
    result = kd_here("predict", f"run={trained}", str(pngs[0]), f"out={tmp_path / 'p.csv'}", *args, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "p.csv").exists()


def test_missing_inputs_and_models_and_an_existing_csv(trained, pngs, tmp_path):
    assert_one_line_error(kd_here("predict", f"run={trained}", str(tmp_path / "nope"), cwd=tmp_path), "does not exist")
    assert_one_line_error(kd_here("predict", f"run={tmp_path / 'norun'}", str(pngs[0]), cwd=tmp_path), "does not exist")
    assert_one_line_error(kd_here("predict", str(pngs[0]), cwd=tmp_path), "--run")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(kd_here("predict", f"run={trained}", str(tmp_path / "empty"), cwd=tmp_path), "no images")
    existing = tmp_path / "keep.csv"
    existing.write_text("mine\n")
    refused = kd_here("predict", f"run={trained}", str(pngs[0]), f"out={existing}", cwd=tmp_path)
    assert_one_line_error(refused, "keep.csv exists", "overwrite=true")
    assert existing.read_text() == "mine\n"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """The trained model exported to ONNX by the real command (in a subprocess)."""
    export_dir = tmp_path_factory.mktemp("export") / "run"
    result = kd_here("export", f"run={trained}", f"hydra.run.dir={export_dir}", cwd=export_dir.parent)
    assert result.code == 0, result.stderr
    return next(export_dir.glob("*.onnx"))


def test_predict_from_the_exported_onnx_file_through_the_cli(trained, exported, pngs, tmp_path):
    """The real command in a subprocess: kd predict on the .onnx through onnxruntime."""
    via_onnx, via_torch = tmp_path / "onnx.csv", tmp_path / "torch.csv"
    result = kd("predict", f"run={exported}", str(pngs[0]), f"out={via_onnx}", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert kd_here("predict", f"run={trained}", str(pngs[0]), f"out={via_torch}", cwd=tmp_path).code == 0
    a, b = rows_of(via_onnx), rows_of(via_torch)
    assert [r["class1"] for r in a] == [r["class1"] for r in b]
    assert np.allclose([float(r["prob1"]) for r in a], [float(r["prob1"]) for r in b], atol=1e-4)


def test_an_onnx_file_is_fed_and_named_by_the_description_it_carries(trained, exported, pngs, tmp_path):
    """kd export embeds model.json in the file: it is used without the copy beside it; a model.json beside
    it that disagrees (another model's classes) is one line, never a silent relabelling; a file without
    one whose outputs do not fit the model.json beside it is one line, not an index error."""
    import json

    import onnx

    alone = tmp_path / "alone" / "model.onnx"
    alone.parent.mkdir()
    shutil.copy(exported, alone)
    out = tmp_path / "alone.csv"
    assert kd_here("predict", f"run={alone}", str(pngs[0]), f"out={out}", cwd=tmp_path).code == 0
    assert len(rows_of(out)) == 20

    meta = json.loads(exported.with_name("model.json").read_text())
    foreign = {**meta, "class_names": list(reversed(meta["class_names"]))}
    alone.with_name("model.json").write_text(json.dumps(foreign))
    line = assert_one_line_error(
        kd_here("predict", f"run={alone}", str(pngs[0]), f"out={tmp_path / 'x.csv'}", cwd=tmp_path),
        "disagrees with the model.json kd export embedded",
        "class_names",
    )
    assert "remove or replace it" in line and not (tmp_path / "x.csv").exists()

    bare = tmp_path / "bare" / "model.onnx"  # an ONNX file from elsewhere: no description inside
    bare.parent.mkdir()
    program = onnx.load(str(exported))
    del program.metadata_props[:]
    onnx.save(program, str(bare))
    fewer = {**meta, "num_classes": 4, "class_names": meta["class_names"][:4]}
    bare.with_name("model.json").write_text(json.dumps(fewer))
    assert_one_line_error(
        kd_here("predict", f"run={bare}", str(pngs[0]), f"out={tmp_path / 'y.csv'}", cwd=tmp_path),
        "gives 10 scores per image",
        "lists 4 classes",
    )
    bare.with_name("model.json").unlink()
    assert_one_line_error(
        kd_here("predict", f"run={bare}", str(pngs[0]), f"out={tmp_path / 'y.csv'}", cwd=tmp_path),
        "carries no kd model description",
    )


def test_an_output_that_cannot_be_written_is_refused_before_any_work(trained, pngs, tmp_path):
    """out= a folder, under a file, a device, the model's own run directory or one of the images: one line
    before any image is classified (the CSV once replaced the model and an input image); a symlink to a
    file is written through, not replaced."""
    (tmp_path / "afile").write_text("x")
    image = sorted(pngs[0].rglob("*.png"))[0]
    for out, fragment in (
        (tmp_path, "is a folder"),
        (tmp_path / "afile" / "p.csv", "is a file, not a folder"),
        (Path("/dev/null"), "is not a regular file"),
        (trained / "p.csv", "inside the run directory"),
        (image, "one of the files this command reads"),
    ):
        line = assert_one_line_error(
            kd_here("predict", f"run={trained}", str(pngs[0]), f"out={out}", "overwrite=true", cwd=tmp_path), fragment
        )
        assert "hydra" not in line
    target, link = tmp_path / "target.csv", tmp_path / "link.csv"
    target.write_text("old")
    link.symlink_to(target)
    assert kd_here("predict", f"run={trained}", str(image), f"out={link}", "overwrite=true", cwd=tmp_path).code == 0
    assert link.is_symlink() and target.read_text().startswith("file,class1")


def test_the_evaluation_crop_follows_the_models_crop_fraction():
    """Image-folder models are fed as kd evaluated them: resize to size / crop_fraction, keep the centre;
    crop_fraction=1 (recorded in model.json) keeps the whole image, as for a model trained on whole images."""
    from PIL import Image

    from kd_cli.commands.inference import preprocessing
    from kd_cli.data.loader import folder_transform
    from kd_cli.engine.artifacts import ModelSpec

    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:2] = 255  # a white top border
    image = Image.fromarray(pixels)
    whole = folder_transform(None, 16, [0.0] * 3, [1.0] * 3, crop_fraction=1.0)(image)
    assert torch.allclose(whole, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    cropped = folder_transform(None, 16, [0.0] * 3, [1.0] * 3)(image)
    assert not torch.allclose(cropped, whole, atol=1e-3)  # the 0.875 crop is another framing
    spec = ModelSpec("cnn", {}, 2, 3, 16, [0.0] * 3, [1.0] * 3, ["a", "b"], "imagefolder", {"crop_fraction": 1.0})
    assert torch.allclose(preprocessing(spec)(image), whole)
    spec.extra = {}
    assert torch.allclose(preprocessing(spec)(image), cropped)


def test_a_latin1_name_and_a_folder_loop_are_predicted_once(trained, pngs, tmp_path):
    """Folders are read as the image-folder data set reads them: symlinks followed, a loop named and not
    followed; a file name that is not UTF-8 is predicted, its CSV cell holding the name's own bytes."""
    root, _, _ = pngs
    folder = tmp_path / "in"
    folder.mkdir()
    source = sorted(root.rglob("*.png"))[0]
    latin1 = os.fsdecode(bytes(folder) + b"/caf\xe9.png")
    Path(latin1).write_bytes(source.read_bytes())
    (folder / "again").symlink_to(folder, target_is_directory=True)
    out = tmp_path / "p.csv"
    result = kd_here("predict", f"run={trained}", str(folder), f"out={out}", cwd=tmp_path)
    assert result.code == 0, result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert warning.startswith("kd: warning: ") and "again is a symlink" in warning and "a loop, not followed" in warning
    assert out.read_bytes().splitlines()[1].startswith(os.fsencode(latin1))


def test_a_fifo_is_named_not_read(trained, tmp_path):
    """An input that exists but is no regular file (a FIFO would block the read for ever) is one line."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert_one_line_error(
        kd_here("predict", f"run={trained}", str(fifo), f"out={tmp_path / 'p.csv'}", cwd=tmp_path),
        "is not a regular file",
    )


def test_a_torchscript_file_says_which_models_predict_reads(trained, pngs, tmp_path):
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04")
    assert_one_line_error(
        kd_here("predict", f"run={tmp_path / 'model.pt'}", str(pngs[0]), f"out={tmp_path / 'p.csv'}", cwd=tmp_path),
        "not a model kd predict reads",
        "format=onnx",
    )


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"input_size": 1e9}, "input_size must be whole numbers in range"),
        ({"std": [0.0]}, "std must be > 0"),
        ({"class_names": ["0", "0", "2", "3", "4", "5", "6", "7", "8", "9"]}, "class_names repeats '0'"),
        ({"num_classes": 3}, "class_names must list 3 names"),
    ],
)
def test_a_damaged_model_json_is_one_line_naming_it(trained, pngs, tmp_path, change, fragment):
    import json

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, **change}))
    result = kd_here("predict", f"run={run}", str(pngs[0]), f"out={tmp_path / 'p.csv'}", cwd=tmp_path)
    assert_one_line_error(result, "model.json is not a valid kd model description", fragment)
