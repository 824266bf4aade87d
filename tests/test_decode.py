"""The batched image-folder path (data/decode.py): the same pixels as PIL, RandomResizedCrop's boxes,
draws that depend on (seed, epoch, index) alone, and the safety of the PIL path kept."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from formats import digits_images, save_image, truncate
from PIL import Image

from kd_cli.data import Augmentation, load_dataset, make_loader
from kd_cli.data import images as image_files
from kd_cli.data.decode import CroppedBatches, random_resized_boxes, uniforms
from kd_cli.data.images import UnreadableImage, decode_rgb, header_size, read_rgb


def photo(height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def as_pil_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(read_rgb(str(path)))).permute(2, 0, 1)


@pytest.fixture(params=["torchcodec", "torchvision"])
def decoder(request, monkeypatch):
    """Both decoders: TorchCodec (installed by the test extra) and torchvision.io (without it)."""
    image_files.image_decoder.cache_clear()
    if request.param == "torchvision":
        monkeypatch.setitem(__import__("sys").modules, "torchcodec.decoders", None)
    yield request.param
    image_files.image_decoder.cache_clear()


def test_png_pixels_equal_pils(tmp_path, decoder):
    for name, array in {"rgb.png": photo(), "grey.png": photo()[..., 0], "palette.png": None}.items():
        path = tmp_path / name
        if array is None:
            Image.fromarray(photo()).convert("P").save(path)
        else:
            save_image(path, array)
        assert torch.equal(decode_rgb(str(path)), as_pil_tensor(path)), name


def test_jpeg_pixels_match_pils(tmp_path, decoder):
    for name, options in {
        "baseline.jpg": {},
        "progressive.jpg": {"progressive": True},
        "exif.jpg": {"exif": Image.Exif()},
    }.items():
        path = save_image(tmp_path / name, photo(), quality=90, **options)
        ours, pils = decode_rgb(str(path)).int(), as_pil_tensor(path).int()
        assert ours.shape == pils.shape == (3, 40, 56)
        assert (ours - pils).abs().max() <= 2, name  # the same libjpeg family; IDCT rounding may differ by 1-2


def test_other_formats_go_through_pil(tmp_path):
    bmp = save_image(tmp_path / "a.bmp", photo())
    assert torch.equal(decode_rgb(str(bmp)), as_pil_tensor(bmp))


def test_a_16_bit_png_is_scaled_to_8_bits(tmp_path, decoder):
    deep = tmp_path / "deep.png"
    values = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)
    Image.fromarray(values).save(deep)
    image = decode_rgb(str(deep))
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert (image[0].int() - torch.from_numpy((values >> 8).astype(np.int32))).abs().max() <= 1


def test_header_sizes():
    png = io.BytesIO()
    Image.fromarray(photo(17, 23)).save(png, format="PNG")
    assert header_size(png.getvalue()) == (23, 17)
    for options in ({}, {"progressive": True}, {"exif": Image.Exif()}):
        jpeg = io.BytesIO()
        Image.fromarray(photo(17, 23)).save(jpeg, format="JPEG", **options)
        assert header_size(bytearray(jpeg.getvalue())) == (23, 17)
    assert header_size(b"BM" + bytes(60)) is None and header_size(b"") is None


def test_a_broken_file_is_one_line_naming_it(tmp_path):
    path = truncate(save_image(tmp_path / "cut.jpg", photo(200, 200)), keep=0.3)
    try:
        decode_rgb(str(path))  # a truncated JPEG: libjpeg may fill the rest with grey, as PIL would refuse
    except UnreadableImage as error:
        assert "cut.jpg" in str(error) and "\n" not in str(error)
    text = tmp_path / "text.png"
    text.write_text("not an image")
    with pytest.raises(UnreadableImage, match="text.png"):
        decode_rgb(str(text))


def test_a_decompression_bomb_header_never_reaches_the_fast_decoder(tmp_path, monkeypatch):
    """A PNG whose header claims 100k x 100k pixels goes to PIL, whose bomb check refuses it."""
    png = io.BytesIO()
    Image.fromarray(photo(8, 8)).save(png, format="PNG")
    data = bytearray(png.getvalue())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    monkeypatch.setattr(image_files, "image_decoder", lambda: pytest.fail("the fast decoder was called"))
    with pytest.raises(UnreadableImage, match="bomb.png"):
        decode_rgb(str(path))


def test_boxes_follow_random_resized_crop():
    count = 20_000
    heights, widths = np.full(count, 375), np.full(count, 500)
    top, left, h, w = random_resized_boxes(heights, widths, uniforms(0, 0, list(range(count)), 23)).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    share, ratio = h * w / (375 * 500), w / h
    assert 0.07 <= share.min() and share.max() <= 1.0 and abs(share.mean() - 0.43) < 0.03
    assert 3 / 4 - 0.02 <= ratio.min() and ratio.max() <= 4 / 3 + 0.02
    # a strip no box of the allowed ratios fits in: the central crop of ratio 4/3 (torchvision's fallback)
    thin = random_resized_boxes(np.array([4]), np.array([400]), np.full((1, 23), 0.99))
    assert thin.tolist() == [[0, 197, 4, 5]]


def test_draws_depend_on_seed_epoch_and_index_alone():
    alone = uniforms(3, 7, [42], 23)
    in_batch = uniforms(3, 7, [5, 42, 9], 23)[1:2]
    assert np.array_equal(alone, in_batch)
    assert not np.array_equal(alone, uniforms(3, 8, [42], 23))
    assert not np.array_equal(alone, uniforms(4, 7, [42], 23))
    u = uniforms(0, 0, list(range(50_000)), 4)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    images, labels = digits_images(200, size=32)
    for i, (image, label) in enumerate(zip(images, labels)):
        save_image(root / str(label) / f"{i}.{'png' if i % 2 else 'jpg'}", image)
    return root


def epochs_of(folder: Path, workers: int, epochs: int = 2, first: int = 0) -> list[torch.Tensor]:
    data = load_dataset({"name": "imagefolder", "root": str(folder), "image_size": 16, "val_fraction": 0.0})
    loader = make_loader(
        data.train,
        batch_size=32,
        train=True,
        spec=Augmentation(crop_padding=4, hflip=True),
        mean=[0.5],
        std=[0.25],
        device=torch.device("cpu"),
        seed=1,
        drop_last=True,
        num_workers=workers,
    )
    assert loader.batched
    out = []
    for epoch in range(first, first + epochs):
        loader.set_epoch(epoch)
        out.append(torch.cat([images for images, _ in loader]))
    return out


def test_the_batches_do_not_depend_on_the_workers(folder):
    alone, two = epochs_of(folder, 0), epochs_of(folder, 2)
    assert all(torch.equal(a, b) for a, b in zip(alone, two))
    assert not torch.equal(alone[0], alone[1])  # another epoch, other crops
    assert alone[0].dtype == torch.float32 and alone[0].shape[1:] == (3, 16, 16)
    assert abs(alone[0].mean().item()) < 3  # normalised


def test_a_resumed_epoch_sees_the_same_batches(folder):
    assert torch.equal(epochs_of(folder, 2, epochs=1, first=1)[0], epochs_of(folder, 2)[1])


def test_an_early_stop_leaves_the_next_epoch_working(folder):
    data = load_dataset({"name": "imagefolder", "root": str(folder), "image_size": 16, "val_fraction": 0.0})
    loader = make_loader(
        data.train,
        batch_size=32,
        train=True,
        spec=Augmentation(crop_padding=4, hflip=True),
        mean=[0.5],
        std=[0.25],
        device=torch.device("cpu"),
        seed=1,
        drop_last=True,
        num_workers=2,
    )
    for _ in zip(range(2), loader):  # stops after two batches (trainer.max_steps_per_epoch)
        pass
    loader.set_epoch(1)
    assert len(list(loader)) == len(loader)


def test_trivial_augment_keeps_the_per_image_path(folder):
    data = load_dataset({"name": "imagefolder", "root": str(folder), "image_size": 16, "val_fraction": 0.0})
    loader = make_loader(
        data.train,
        batch_size=32,
        train=True,
        spec=Augmentation(crop_padding=4, trivial_augment=True),
        mean=[0.5],
        std=[0.25],
        device=torch.device("cpu"),
        seed=1,
        num_workers=0,
    )
    assert not loader.batched and next(iter(loader))[0].shape == (32, 3, 16, 16)


def test_an_unreadable_image_in_a_worker_is_one_line(tmp_path, folder):
    import shutil

    root = tmp_path / "digits"
    shutil.copytree(folder, root)
    (root / "3" / "broken.png").write_text("not an image")
    data = load_dataset(
        {"name": "imagefolder", "root": str(root), "image_size": 16, "val_fraction": 0.0, "test_fraction": 0.1}
    )
    loader = make_loader(
        data.train,
        batch_size=32,
        train=True,
        spec=Augmentation(crop_padding=4, hflip=True),
        mean=[0.5],
        std=[0.25],
        device=torch.device("cpu"),
        seed=1,
        num_workers=2,
    )
    if not any(path.endswith("broken.png") for path, _ in loader.dataset.samples):
        pytest.skip("the broken file fell in the test split")
    with pytest.raises(UnreadableImage) as caught:
        list(loader)
    assert "broken.png" in str(caught.value) and "\n" not in str(caught.value)
    assert "dataset.skip_unreadable" in str(caught.value)
    assert isinstance(loader.dataset, CroppedBatches)
