"""Trust in the data: bad files name themselves (or are skipped, and counted), degenerate splits are
refused, leaks between train and test are reported, no data file runs code, and every dataset value is
checked before anything is loaded.

Files are written in their real formats (PNG/JPEG through Pillow, CIFAR's pickled batches, MNIST's IDX
and torchvision's legacy .pt, SVHN's .mat) from real images where we have them (scikit-learn's digits,
the MNIST test set), and read through the real loaders, in-process.
"""

from __future__ import annotations

import math
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch
from formats import (
    MNIST_T10K,
    Payload,
    cifar_batch,
    damage_jpeg_header,
    digits_images,
    load_mnist_t10k,
    md5,
    save_image,
    truncate,
    write_cifar,
    write_mnist_raw,
    write_pickle,
)
from omegaconf import OmegaConf
from torchvision import datasets as tv

from kd_cli.data import DATASETS, DataSplits, TensorSplit, check_dataset_config, load_dataset, make_loader, safe_pickle
from kd_cli.data.base import folder_samples
from kd_cli.data.checks import check_splits, file_duplicates, tensor_duplicates
from kd_cli.data.folder import scan
from kd_cli.errors import KdError

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CLASSES = ("four", "one", "seven")  # sorted, as ImageFolder orders them
DIGIT_OF = {"four": 4, "one": 1, "seven": 7}


def dataset_node(name: str) -> dict:
    yaml = OmegaConf.load(REPO / f"configs/dataset/{name}.yaml")
    cfg = OmegaConf.merge({"paths": {"data": "data"}}, {"dataset": yaml})
    return OmegaConf.to_container(cfg.dataset, resolve=True)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def warnings_in(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd: warning: ")]


# ------------------------------------------------------------------------------------ image-folder files


def write_digit_folder(root: Path, per_class: int, suffix: str = ".png", offset: int = 0) -> list[Path]:
    """Real handwritten digits as image files: root/<class>/<i><suffix>, `per_class` of each class."""
    images, labels = digits_images(600)
    written = []
    for name in CLASSES:
        picks = np.flatnonzero(labels == DIGIT_OF[name])[offset : offset + per_class]
        written += [save_image(root / name / f"{i}{suffix}", images[i]) for i in picks]
    return written


def break_file(path: Path, kind: str) -> Path:
    """Turn a written image into one of the broken files a real folder holds."""
    if kind == "truncated png":
        return truncate(path)
    if kind == "truncated jpeg":
        jpeg = save_image(path.with_suffix(".jpg"), np.asarray(digits_images(1)[0][0]), quality=90)
        path.unlink()
        return truncate(jpeg)
    if kind == "corrupt jpeg":
        jpeg = save_image(path.with_suffix(".jpg"), np.asarray(digits_images(1)[0][0]), quality=90)
        path.unlink()
        return damage_jpeg_header(jpeg)
    if kind == "text named .png":
        path.write_text("this is a note, not an image\n")
        return path
    raise ValueError(kind)


BROKEN = ["truncated png", "truncated jpeg", "corrupt jpeg", "text named .png"]


def folder_loader(split, num_workers: int):
    return make_loader(
        split,
        batch_size=4,
        train=False,
        spec=None,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        device=CPU,
        seed=0,
        num_workers=num_workers,
    )


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", BROKEN)
def test_an_unreadable_image_is_one_line_naming_the_file(tmp_path, kind, num_workers):
    write_digit_folder(tmp_path / "train", 3)
    write_digit_folder(tmp_path / "test", 2, offset=10)
    bad = break_file(sorted((tmp_path / "test" / "one").iterdir())[1], kind)
    data = load_dataset({"name": "imagefolder", "root": str(tmp_path), "image_size": 16})  # no scan without the switch
    assert len(data.test) == 6
    with pytest.raises(KdError) as error:
        list(folder_loader(data.test, num_workers))
    message = one_line(error)
    assert message.startswith(f"cannot read image {bad} (") and "dataset.skip_unreadable=true" in message
    assert "Traceback" not in message and "worker" not in message
    if kind == "text named .png" or kind == "corrupt jpeg":
        assert "not a JPEG, PNG" in message
    else:
        assert "truncated" in message.lower()


def test_a_postscript_file_named_png_is_never_handed_to_ghostscript(tmp_path):
    # Pillow picks its decoder from the contents; its EPS decoder runs Ghostscript. kd opens raster formats only.
    write_digit_folder(tmp_path / "train", 2)
    write_digit_folder(tmp_path / "test", 1, offset=10)
    eps = tmp_path / "test" / "four" / "x.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n")
    data = load_dataset({"name": "imagefolder", "root": str(tmp_path), "image_size": 16})
    with pytest.raises(KdError, match=r"cannot read image .*x\.png \(not a JPEG, PNG"):
        list(folder_loader(data.test, 0))


def test_skip_unreadable_leaves_them_out_counts_them_and_keeps_the_split_deterministic(tmp_path, capsys):
    good = write_digit_folder(tmp_path / "mixed", 10)  # class folders alone: kd splits them
    clean = tmp_path / "clean"  # the same files, never with broken ones beside them
    for path in good:
        target = clean / path.relative_to(tmp_path / "mixed")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    broken = [
        break_file(save_image(tmp_path / "mixed" / name / f"bad{i}.png", digits_images(1)[0][0]), kind)
        for i, (name, kind) in enumerate(zip(["four", "one", "seven", "one"], BROKEN))
    ]
    node = {"name": "imagefolder", "root": str(tmp_path / "mixed"), "image_size": 16, "test_fraction": 0.3}

    data = load_dataset({**node, "skip_unreadable": True})
    skipped = [w for w in warnings_in(capsys) if "unreadable" in w]
    assert len(skipped) == 1 and "skipped 4 unreadable image(s) of 34" in skipped[0]
    assert sum(f"{b.parent.name}/{b.name} (" in skipped[0] for b in broken) == 3 and "and 1 more" in skipped[0]
    assert (len(data.train), len(data.test)) == (21, 9) and data.num_classes == 3
    kept = sorted(path for split in (data.train, data.test) for path, _ in folder_samples(split.dataset))
    assert kept == sorted(map(str, good))
    assert [len(torch.cat([x for x, _ in folder_loader(split, 0)])) for split in (data.train, data.test)] == [21, 9]

    again = load_dataset({**node, "skip_unreadable": True})
    assert again.train.dataset.indices == data.train.dataset.indices and again.fingerprint == data.fingerprint
    # The split and the fingerprint are those of a folder that never held the broken files ...
    reference = load_dataset({**node, "root": str(clean)})
    assert reference.fingerprint == data.fingerprint
    assert reference.train.dataset.indices == data.train.dataset.indices
    # ... and not those of the folder read with them (no scan without the switch: 34 files listed).
    unscanned = load_dataset(node)
    assert len(unscanned.train) + len(unscanned.test) == 34 and unscanned.fingerprint != data.fingerprint
    for path in broken:
        path.unlink()
    assert load_dataset(node).fingerprint == data.fingerprint


def test_the_scan_finds_the_same_files_with_threads_and_with_processes(tmp_path):
    # Large folders are scanned by processes, small ones by threads: both must find exactly the broken files.
    good = write_digit_folder(tmp_path, 2)
    broken = [break_file(path, kind) for path, kind in zip(good[:4], BROKEN)]
    paths = sorted(str(p) for p in tmp_path.rglob("*.*"))
    found = scan(paths, str(tmp_path), processes=False)
    assert [path for path, problem in zip(paths, found) if problem] == sorted(map(str, broken))
    assert scan(paths, str(tmp_path), processes=True) == found


def test_skipping_that_empties_a_training_class_is_refused_naming_it(tmp_path):
    write_digit_folder(tmp_path / "train", 2)
    write_digit_folder(tmp_path / "test", 2, offset=10)
    for path in (tmp_path / "train" / "seven").iterdir():
        truncate(path)
    with pytest.raises(KdError) as error:
        load_dataset({"name": "imagefolder", "root": str(tmp_path), "skip_unreadable": True})
    assert "training split has no images of class seven" in one_line(error)


# ------------------------------------------------------------------------------------- degenerate splits


def test_an_image_folder_with_one_class_is_refused(tmp_path):
    for layout in ("alone", "train-test"):
        root = tmp_path / layout
        for part in ["."] if layout == "alone" else ["train", "test"]:
            images, _ = digits_images(8)
            for i, image in enumerate(images):
                save_image(root / part / "cats" / f"{i}.png", image)
        with pytest.raises(KdError) as error:
            load_dataset({"name": "imagefolder", "root": str(root), "test_fraction": 0.25})
        message = one_line(error)
        assert "1 class folder (cats)" in message and "at least 2" in message


@pytest.mark.parametrize("target", ["root", "class folder", "above the root"])
def test_a_directory_symlink_loop_is_named_and_not_followed(tmp_path, capsys, target):
    """A folder symlink back into a folder it is inside is not gone round (24 images became 197, the
    test split copies of the training split): one warning names it, each image is read once."""
    root = tmp_path / "data"
    write_digit_folder(root, per_class=8)
    aim = {"root": root, "class folder": root / "one", "above the root": tmp_path}[target]
    (root / "one" / "again").symlink_to(aim, target_is_directory=True)
    elsewhere = tmp_path / "more"  # a symlink to a folder outside the data is followed, as before
    write_digit_folder(elsewhere, per_class=2, offset=8)
    (root / "four" / "extra").symlink_to(elsewhere / "four", target_is_directory=True)
    data = load_dataset({"name": "imagefolder", "root": str(root), "test_fraction": 0.25, "image_size": 8})
    assert len(data.train) + len(data.test) == 3 * 8 + 2
    (warning,) = warnings_in(capsys)
    assert f"{root / 'one' / 'again'} is a symlink to {aim}" in warning and "a loop, not followed" in warning


def test_hidden_entries_special_files_and_a_class_without_images(tmp_path, capsys):
    """Hidden folders and files are neither classes nor images (`.ipynb_checkpoints/` became a class);
    a FIFO named like an image (whose read waited for ever) and a broken symlink are left out with one
    warning naming them; a class folder of GIFs is one line saying kd does not read them."""
    root = tmp_path / "data"
    write_digit_folder(root, per_class=8)
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.png").write_bytes(next((root / "one").iterdir()).read_bytes())
    (root / "one" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    os.mkfifo(root / "one" / "pipe.png")
    (root / "four" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    data = load_dataset({"name": "imagefolder", "root": str(root), "test_fraction": 0.25, "image_size": 8})
    assert data.class_names == list(CLASSES) and len(data.train) + len(data.test) == 3 * 8
    (warning,) = warnings_in(capsys)
    assert "left out 2 entries" in warning and "one/pipe.png" in warning and "four/broken.png" in warning
    (root / "gifs").mkdir()
    (root / "gifs" / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(KdError) as error:
        load_dataset({"name": "imagefolder", "root": str(root), "test_fraction": 0.25, "image_size": 8})
    assert "class folder" in one_line(error) and "gifs has no images (it holds .gif files" in one_line(error)


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    """An old archive's Latin-1 `café.png` is read like any other image (and hashed into the data's
    fingerprint by its bytes); when it cannot be decoded, the one line names it with an escape."""
    root = tmp_path / "data"
    first, *_ = write_digit_folder(root, per_class=8)  # one/... is written first (CLASSES is sorted)
    latin1 = Path(os.fsdecode(bytes(root / "one") + b"/caf\xe9.png"))  # (surrogateescape: the raw byte 0xE9)
    latin1.write_bytes(first.read_bytes())
    data = load_dataset({"name": "imagefolder", "root": str(root), "test_fraction": 0.25, "image_size": 8})
    assert len(data.train) + len(data.test) == 3 * 8 + 1
    split = next(s for s in (data.train, data.test) if str(latin1) in [p for p, _ in folder_samples(s.dataset)])
    latin1.write_text("not an image")
    loader = make_loader(
        split, batch_size=64, train=False, spec=None, mean=[0.5] * 3, std=[0.5] * 3, device=CPU, seed=0, num_workers=0
    )
    with pytest.raises(KdError) as error:
        list(loader)
    assert "one/caf\\xe9.png (" in one_line(error)


def tensor_data(train_labels, test_labels, classes: int = 3) -> DataSplits:
    """In-memory splits of 1x1 images, all different, with the labels given."""

    def split(labels, start):
        pixels = torch.arange(start, start + len(labels), dtype=torch.uint8).view(-1, 1, 1, 1)
        return TensorSplit(pixels, torch.as_tensor(labels, dtype=torch.int64))

    return DataSplits(
        split(train_labels, 0), split(test_labels, 100), classes, [f"c{i}" for i in range(classes)], 1, 1, "x"
    )


def test_empty_splits_are_refused():
    for train, test, which in (([], [0, 1], "training"), ([0, 1, 2], [], "test")):
        with pytest.raises(KdError) as error:
            check_splits(tensor_data(train, test), "mine")
        assert f"the {which} split is empty" in one_line(error) and "dataset=mine" in str(error.value)


def test_class_coverage_rules():
    with pytest.raises(KdError, match=r"has 1 class \(c0\)"):
        check_splits(tensor_data([0, 0], [0], classes=1), "x")
    with pytest.raises(KdError, match=r"training split has images of c1 only"):
        check_splits(tensor_data([1, 1, 1], [1, 1]), "x")
    with pytest.raises(KdError) as error:
        check_splits(tensor_data([0, 1, 0], [0, 2, 2, 1]), "x")
    assert "no images of class c2, which the test split has (2 images)" in one_line(error)
    with pytest.raises(KdError, match=r"label 3, outside 0\.\.2"):
        check_splits(tensor_data([0, 1, 3], [0, 1]), "x")
    with pytest.raises(KdError, match=r"label -1"):
        check_splits(tensor_data([0, 1, 2], [-1, 1]), "x")
    check_splits(tensor_data([0, 1, 2], [2, 1, 0]), "x")  # a sound data set passes


def test_a_test_split_missing_classes_is_a_warning(capsys):
    data = load_dataset(
        {"name": "synthetic", "num_train": 40, "num_test": 6, "num_classes": 10, "channels": 1, "image_size": 4}
    )
    assert len(data.test) == 6  # a warning does not stop anything
    (warning,) = warnings_in(capsys)
    assert "the test split has no images of 4 of the 10 classes (class_6, class_7, class_8, class_9)" in warning


def test_digits_too_small_a_split_is_one_line():
    with pytest.raises(KdError) as error:
        load_dataset({"name": "digits", "test_fraction": 0.002})
    assert "dataset.test_fraction=0.002" in one_line(error)


def test_real_cifar_files_whose_training_batches_lack_a_class_are_refused(tmp_path, monkeypatch):
    folder = tmp_path / tv.CIFAR10.base_folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, _ in tv.CIFAR10.train_list:
        write_pickle(folder / name, cifar_batch(rng, 5, 10, "labels", labels=[0, 1, 2, 3, 4, 5, 6, 8, 9])[0])
    write_pickle(folder / "test_batch", cifar_batch(rng, 5, 10, "labels", labels=[7])[0])
    write_pickle(
        folder / "batches.meta",
        {"label_names": ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]},
    )
    with pytest.raises(KdError) as error:
        load_dataset({"name": "cifar10", "root": str(tmp_path), "verify_checksums": False})
    assert "no images of class horse, which the test split has (5 images)" in one_line(error)
    batch = cifar_batch(rng, 5, 10, "labels")[0]
    write_pickle(folder / "test_batch", {**batch, "labels": [0, 1, 12, 3, 4]})
    with pytest.raises(KdError, match=r"test split has label 12, outside 0\.\.9"):
        load_dataset({"name": "cifar10", "root": str(tmp_path), "verify_checksums": False})


# ---------------------------------------------------------------------------------------------- duplicates


def test_default_digits_has_no_duplicates_and_no_warning(capsys):
    data = load_dataset(dataset_node("digits"))
    assert tensor_duplicates(data.train.images, data.test.images) == []
    assert warnings_in(capsys) == []  # the default run stays quiet


@pytest.fixture(scope="module")
def mnist_t10k():
    if not MNIST_T10K.is_dir():
        pytest.skip(f"real MNIST test files not at {MNIST_T10K}")
    return load_mnist_t10k()


def test_mnist_test_images_copied_from_training_are_reported(tmp_path, mnist_t10k, capsys):
    images, labels = (array.copy() for array in mnist_t10k)
    write_mnist_raw(tmp_path / "clean", images, labels)
    load_dataset({"name": "mnist", "root": str(tmp_path / "clean")})
    assert warnings_in(capsys) == []  # the real test set has no exact duplicates
    for test_index, train_index in ((7005, 12), (9000, 345), (7100, 6999)):
        images[test_index], labels[test_index] = images[train_index], labels[train_index]
    labels[7100] = (labels[6999] + 1) % 10  # one copy also carries another label
    write_mnist_raw(tmp_path / "leaky", images, labels)
    load_dataset({"name": "mnist", "root": str(tmp_path / "leaky")})
    (warning,) = warnings_in(capsys)
    assert (
        "3 of 3000 test images are exact copies of training images (e.g. test image #5 = training image #12, "
        "1 of them with a different label)" in warning
    )


def test_tensor_duplicates_match_brute_force_at_odd_sizes_and_across_blocks():
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (5000, 3, 7, 7), dtype=torch.uint8, generator=generator)  # 147 bytes: padded
    test = torch.randint(0, 256, (300, 3, 7, 7), dtype=torch.uint8, generator=generator)
    copies = {3: 4999, 50: 0, 51: 4096, 299: 4095}  # both sides of the 4096-row block boundary
    for i, j in copies.items():
        test[i] = train[j]
    near = test[60].clone()
    train[10] = near
    train[10, 2, 6, 6] ^= 1  # one bit away from a test image: not a copy
    rows = {bytes(image.numpy().tobytes()): j for j, image in enumerate(train)}
    expected = sorted(
        (i, rows[image.numpy().tobytes()]) for i, image in enumerate(test) if image.numpy().tobytes() in rows
    )
    assert sorted(tensor_duplicates(train, test)) == expected == sorted(copies.items())


def test_image_folder_duplicates_by_content_not_by_size(tmp_path, capsys):
    images, _ = digits_images(400)
    for name in CLASSES:  # BMP: every file of one size has the same length, so sizes alone would all match
        for i in range(4):
            save_image(tmp_path / "train" / name / f"{i}.bmp", images[len(name) * 10 + i])
            save_image(tmp_path / "test" / name / f"{i}.bmp", images[200 + len(name) * 10 + i])
    copy = (tmp_path / "train" / "one" / "2.bmp").read_bytes()
    (tmp_path / "test" / "seven" / "3.bmp").write_bytes(copy)
    save_image(tmp_path / "test" / "four" / "9.png", images[300])  # a size no training file has
    train = sorted(map(str, (tmp_path / "train").rglob("*.bmp")))
    test = sorted(map(str, (tmp_path / "test").rglob("*.*")))
    assert len({len(Path(p).read_bytes()) for p in train + test}) == 2
    assert [(test[i], train[j]) for i, j in file_duplicates(train, test)] == [
        (str(tmp_path / "test/seven/3.bmp"), str(tmp_path / "train/one/2.bmp"))
    ]
    # Files alike in size and in their first 4 KiB (BMP stores the bottom rows first) are still told apart.
    big = np.zeros((80, 80), np.uint8)
    top_differs = big.copy()
    top_differs[0, 0] = 1
    pair = [save_image(tmp_path / "pair" / f"{i}.bmp", image) for i, image in enumerate((big, top_differs))]
    assert pair[0].read_bytes()[:4096] == pair[1].read_bytes()[:4096] != pair[1].read_bytes()
    assert file_duplicates([str(pair[0])], [str(pair[1])]) == []
    assert file_duplicates([str(pair[0])], [str(pair[1]), str(pair[0])]) == [(1, 0)]
    load_dataset({"name": "imagefolder", "root": str(tmp_path), "image_size": 16})
    (warning,) = warnings_in(capsys)
    assert (
        "1 of 13 test images are exact copies of training images (e.g. test/seven/3.bmp = train/one/2.bmp "
        f"under {tmp_path}, 1 of them with a different label)" in warning
    )


# ------------------------------------------------------------------------------- no code from data files


def crafted(marker: Path) -> Payload:
    return Payload(open, str(marker), "w")  # runs open(marker, "w") when unpickled: creates the marker


def write_crafted_cifar(root: Path, marker: Path, where: str) -> None:
    write_cifar(root, tv.CIFAR10, np.random.default_rng(0))
    folder = root / tv.CIFAR10.base_folder
    if where == "data_batch_1":
        batch = pickle.loads((folder / where).read_bytes())
        write_pickle(folder / where, {**batch, "batch_label": crafted(marker)})
    elif where == "batches.meta (numpy global)":
        write_pickle(folder / "batches.meta", {"label_names": Payload(np.save, str(marker), np.zeros(1))})
    else:
        write_pickle(folder / where, {"label_names": crafted(marker)})


@pytest.mark.parametrize("verify_checksums", [True, False])
@pytest.mark.parametrize("where", ["data_batch_1", "batches.meta", "batches.meta (numpy global)"])
def test_a_crafted_cifar_pickle_is_refused_and_never_run(tmp_path, monkeypatch, verify_checksums, where):
    marker = tmp_path / "pwned"
    write_crafted_cifar(tmp_path, marker, where)
    folder = tmp_path / tv.CIFAR10.base_folder
    if verify_checksums:  # the md5 table agrees with the crafted files: the check alone would not stop them
        monkeypatch.setattr(tv.CIFAR10, "train_list", [[n, md5(folder / n)] for n, _ in tv.CIFAR10.train_list])
        monkeypatch.setattr(tv.CIFAR10, "test_list", [[n, md5(folder / n)] for n, _ in tv.CIFAR10.test_list])
        monkeypatch.setattr(tv.CIFAR10, "meta", {**tv.CIFAR10.meta, "md5": md5(folder / "batches.meta")})
    with pytest.raises(KdError) as error:
        load_dataset({"name": "cifar10", "root": str(tmp_path), "verify_checksums": verify_checksums})
    message = one_line(error)
    file = where.split(" ")[0]
    assert message.startswith(f"{folder / file} asks to run ") and "kd did not run it" in message
    assert ("numpy.save" if "numpy" in where else "io.open") in message
    assert not marker.exists()
    assert pickle.loads is not safe_pickle.loads and tv.cifar.pickle is pickle  # nothing global was swapped


def test_restricted_unpickler_reads_what_numpy_1_and_2_write():
    arrays = {
        "data": np.arange(24, dtype=np.uint8).reshape(2, 12),
        "f": np.array([1.5, -2.0]),
        "labels": [1, 2, 3],
        "name": b"batch",
        "scalar": np.int64(7),
        "text": "x",
    }
    for protocol in (2, 4, 5):
        blob = pickle.dumps(arrays, protocol=protocol)
        back = safe_pickle.loads(blob, encoding="latin1")
        assert back["labels"] == [1, 2, 3] and back["scalar"] == 7 and back["text"] == "x"
        assert all(np.array_equal(back[k], arrays[k]) for k in ("data", "f"))
    # numpy 1.x (and the official CIFAR files) name numpy.core.multiarray; numpy 2 writes numpy._core.
    blob = pickle.dumps(arrays, protocol=2)
    assert b"numpy._core.multiarray" in blob
    old = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert "numpy.core.multiarray _reconstruct" in str([arg for _, arg, _ in pickletools.genops(old)])
    assert np.array_equal(safe_pickle.loads(old)["data"], arrays["data"])


def test_a_crafted_legacy_mnist_file_is_refused_and_a_real_one_still_loads(tmp_path, mnist_t10k):
    images, labels = mnist_t10k
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for name, part in (("training.pt", slice(0, 7000)), ("test.pt", slice(7000, None))):
        torch.save(
            (torch.from_numpy(images[part].copy()), torch.from_numpy(labels[part].astype(np.int64))), processed / name
        )
    data = load_dataset({"name": "mnist", "root": str(tmp_path)})  # the legacy files of old torchvision versions
    assert (len(data.train), len(data.test)) == (7000, 3000)
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(images[7000:].copy()))
    marker = tmp_path / "pwned"
    torch.save((crafted(marker), torch.zeros(3)), processed / "training.pt")
    with pytest.raises(KdError) as error:
        load_dataset({"name": "mnist", "root": str(tmp_path)})
    assert one_line(error).startswith(f"{processed / 'training.pt'} asks to run io.open when read")
    assert not marker.exists()


def test_svhn_with_images_of_the_wrong_type_is_one_line(tmp_path, monkeypatch):
    sio = pytest.importorskip("scipy.io")
    split_list = dict(tv.SVHN.split_list)
    for split in ("train", "test"):
        url, filename, _ = split_list[split]
        sio.savemat(tmp_path / filename, {"X": np.zeros((32, 32, 3, 4)), "y": np.array([[1], [2], [1], [2]])})
        split_list[split] = [url, filename, md5(tmp_path / filename)]
    monkeypatch.setattr(tv.SVHN, "split_list", split_list)
    with pytest.raises(KdError) as error:
        load_dataset({"name": "svhn", "root": str(tmp_path)})
    assert "look corrupt (images are float64 (3, 32, 32), expected uint8 (3, 32, 32))" in one_line(error)


# ------------------------------------------------------------------------------ config checked up front


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs/dataset").glob("*.yaml")))
def test_every_shipped_dataset_yaml_passes_the_check(name):
    check_dataset_config(dataset_node(name))
    check_dataset_config(OmegaConf.create(dataset_node(name)))  # a DictConfig node as the stages hold it


@pytest.mark.parametrize(
    "name, key, value, expected",
    [
        ("digits", "test_fraction", "abc", "dataset.test_fraction='abc' must be a number"),
        ("digits", "test_fraction", 1.5, "dataset.test_fraction=1.5 must be a number in (0, 1)"),
        ("digits", "test_fraction", math.nan, "dataset.test_fraction=nan must be a finite number"),
        ("digits", "split_seed", -1, "dataset.split_seed=-1 must be a whole number in [0, 4294967295]"),
        ("imagefolder", "image_size", 0, "dataset.image_size=0 must be a whole number >= 1"),
        ("imagefolder", "skip_unreadable", "yes", "dataset.skip_unreadable='yes' must be true or false"),
        ("imagefolder", "test_fraction", 0.0, "dataset.test_fraction=0.0 must be a number in (0, 1)"),
        ("synthetic", "num_classes", 1, "dataset.num_classes=1 must be a whole number in [2, 1000000]"),
        ("synthetic", "num_test", 0, "dataset.num_test=0 must be a whole number in [1, 10000000]"),
        ("synthetic", "image_size", 2.5, "dataset.image_size=2.5 must be a whole number"),
        ("cifar10", "verify_checksums", "no", "dataset.verify_checksums='no' must be true or false"),
        ("mnist", "root", 3, "dataset.root=3 must be a string"),
        (
            "mnist",
            "mean",
            [0.1, math.nan],
            "dataset.mean=[0.1, nan] must be a list whose items are each a finite number",
        ),
        ("mnist", "mean", "0.1", "dataset.mean='0.1' must be a list"),
        ("mnist", "std", [0.0], "dataset.std=[0.0] must be a list of values > 0"),
        ("mnist", "std", [], "dataset.std=[] must be a list of at least one number"),
        ("mnist", "crop_padding", -2, "dataset.crop_padding=-2 must be a whole number >= 0"),
        ("mnist", "crop_padding", True, "dataset.crop_padding=True must be a whole number"),
        ("mnist", "hflip", "no", "dataset.hflip='no' must be true or false"),
        ("mnist", "default_student", 7, "dataset.default_student=7 must be a string"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(name, key, value, expected):
    node = {**dataset_node(name), key: value}
    with pytest.raises(KdError) as error:
        check_dataset_config(node)
    assert one_line(error).startswith(expected)


def test_mean_and_std_must_fit_each_other_and_the_channels():
    with pytest.raises(KdError, match=r"dataset.mean has 3 value\(s\) but dataset.std has 1"):
        check_dataset_config({**dataset_node("cifar10"), "std": [0.2]})
    with pytest.raises(KdError, match=r"dataset.mean has 3 values but mnist images have 1 channel"):
        check_dataset_config({**dataset_node("mnist"), "mean": [0.1] * 3, "std": [0.3] * 3})
    with pytest.raises(KdError, match=r"dataset.mean has 3 values but synthetic images have 1 channel"):
        check_dataset_config({**dataset_node("synthetic"), "channels": 1})
    check_dataset_config({**dataset_node("synthetic"), "channels": 1, "mean": [0.5], "std": [0.3]})
    check_dataset_config({**dataset_node("cifar10"), "mean": [0.5], "std": [0.3]})  # one value: every channel


def test_names_are_checked_and_nothing_is_loaded(tmp_path):
    with pytest.raises(KdError, match="did you mean cifar10"):
        check_dataset_config({"name": "cifar01"})
    with pytest.raises(KdError, match="no 'name'"):
        check_dataset_config({"root": "x"})
    with pytest.raises(KdError, match="did you mean test_fraction"):
        check_dataset_config({"name": "imagefolder", "tset_fraction": 0.2})
    for name in DATASETS.names():  # absent files are the loader's business: the check reads nothing
        check_dataset_config({**dataset_node(name), "root": str(tmp_path / "absent")})
    assert list(tmp_path.iterdir()) == []


def test_load_dataset_checks_the_common_keys_too():
    with pytest.raises(KdError, match=r"dataset.std=\[0.2, -0.1, 0.3\] must be a list of values > 0"):
        load_dataset({**dataset_node("digits"), "std": [0.2, -0.1, 0.3]})
