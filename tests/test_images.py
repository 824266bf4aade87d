"""One image, one set of pixels: training batches, evaluation and `kd predict` read every file through
kd's one decoding path (data/images.decode_rgb), whichever decoder is installed, for the image kinds
that decoders treat differently (16-bit, palette with transparency, grey + alpha, CMYK)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd_cli.commands.inference import preprocessing, read_image
from kd_cli.data import images as image_files
from kd_cli.data import load_dataset, make_loader
from kd_cli.data.decode import CroppedBatches
from kd_cli.data.images import decode_rgb
from kd_cli.engine.artifacts import ModelSpec

SIZE = 12
CPU = torch.device("cpu")


def png_16_bit_rgb(path: Path, rgb: tuple[int, int, int]) -> None:
    """A 16-bit RGB PNG (Pillow cannot write one): IHDR bit depth 16, colour type 2."""
    row = b"\x00" + struct.pack(">HHH", *rgb) * SIZE
    chunk = lambda kind, body: (  # noqa: E731
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )
    header = struct.pack(">IIBBBBB", SIZE, SIZE, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * SIZE)) + chunk(b"IEND", b"")
    )


def flat(mode: str, value) -> Image.Image:
    return Image.new(mode, (SIZE, SIZE), value)


def write_kinds(folder: Path) -> dict[str, tuple[int, int, int]]:
    """One flat-coloured file of each kind, and the RGB colour kd must read from it."""
    folder.mkdir(parents=True)
    expected = {}
    grey16 = np.full((SIZE, SIZE), 0x80FF, np.uint16)  # high byte 0x80; rounding would give 0x81, clipping 0xFF
    Image.fromarray(grey16).save(folder / "grey16.png")
    expected["grey16.png"] = (0x80,) * 3
    png_16_bit_rgb(folder / "rgb16.png", (0x1234, 0x80FF, 0xFEDC))
    expected["rgb16.png"] = (0x12, 0x80, 0xFE)
    Image.fromarray(grey16).save(folder / "grey16.tif")
    expected["grey16.tif"] = (0x80,) * 3
    palette = flat("RGB", (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(folder / "palette.png", transparency=0)
    expected["palette.png"] = (10, 200, 30)
    flat("LA", (77, 0)).save(folder / "grey_alpha.png")
    expected["grey_alpha.png"] = (77,) * 3
    flat("RGBA", (1, 2, 3, 0)).save(folder / "rgba.png")
    expected["rgba.png"] = (1, 2, 3)
    flat("CMYK", (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=100)
    expected["cmyk.jpg"] = tuple(Image.open(folder / "cmyk.jpg").convert("RGB").getpixel((0, 0)))
    flat("L", 90).save(folder / "grey.bmp")
    expected["grey.bmp"] = (90,) * 3
    Image.fromarray(np.full((SIZE, SIZE), 0.5, np.float32)).save(folder / "float.tif")  # 0..1 floats
    expected["float.tif"] = (128,) * 3
    return expected


@pytest.fixture(params=["torchcodec", "torchvision"])
def decoder(request, monkeypatch):
    image_files.image_decoder.cache_clear()
    if request.param == "torchvision":
        monkeypatch.setitem(__import__("sys").modules, "torchcodec.decoders", None)
    yield request.param
    image_files.image_decoder.cache_clear()


def test_each_kind_decodes_to_its_colour(tmp_path, decoder):
    for name, colour in write_kinds(tmp_path / "kinds").items():
        image = decode_rgb(str(tmp_path / "kinds" / name))
        assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE), name
        assert image.flatten(1).unique(dim=1).T.tolist() == [list(colour)], name


def test_training_evaluation_and_predict_see_the_same_pixels(tmp_path, decoder):
    """The same flat colour from a training batch, an evaluation batch and kd predict's preprocessing."""
    expected = write_kinds(tmp_path / "one" / "kinds")
    (tmp_path / "two" / "other").mkdir(parents=True)
    flat("RGB", (5, 5, 5)).save(tmp_path / "two" / "other" / "x.png")
    for root in ("train", "test"):  # a train/ and test/ layout of the same files
        (tmp_path / "data" / root).mkdir(parents=True)
        for part in ("one", "two"):
            (tmp_path / "data" / root / part).symlink_to(tmp_path / part / ("kinds" if part == "one" else "other"))
    node = {"name": "imagefolder", "root": str(tmp_path / "data"), "image_size": SIZE, "crop_fraction": 1.0}
    data = load_dataset({**node, "val_fraction": 0})
    mean, std = [0.0] * 3, [1 / 255] * 3  # normalised pixels are the 0..255 values themselves

    samples = data.train.dataset.samples
    crops, _ = CroppedBatches(samples, SIZE, seed=0, hflip=False).__getitems__(list(range(len(samples))))
    test = make_loader(data.test, batch_size=64, train=False, spec=None, mean=mean, std=std, device=CPU, seed=0)
    (evaluated, _), *_ = list(test)
    spec = ModelSpec("cnn", {}, 2, 3, SIZE, mean, std, ["one", "two"], "imagefolder", {"crop_fraction": 1.0})
    transform = preprocessing(spec)
    for row, (path, _) in enumerate(samples):
        name = Path(path).name
        colour = torch.tensor(expected.get(name, (5, 5, 5)), dtype=torch.float32).view(3, 1, 1)
        assert torch.equal(torch.from_numpy(crops[row]).float(), colour.expand(3, SIZE, SIZE)), f"training: {name}"
        assert torch.allclose(evaluated[row], colour, atol=1e-3), f"evaluation: {name}"
        assert torch.allclose(read_image(Path(path), transform), colour, atol=1e-3), f"predict: {name}"


def test_a_grey_image_reaches_a_grey_model_unchanged(tmp_path):
    """kd predict for a one-channel model: a grey file read as RGB and turned back to grey is the file."""
    values = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    Image.fromarray(values).save(tmp_path / "g.png")
    spec = ModelSpec("cnn", {}, 10, 1, SIZE, [0.0], [1 / 255], [str(i) for i in range(10)], "digits")
    assert torch.allclose(read_image(tmp_path / "g.png", preprocessing(spec))[0], torch.from_numpy(values).float())


def test_a_large_image_is_read_with_a_kd_warning(tmp_path, monkeypatch, capsys):
    """Over Pillow's MAX_IMAGE_PIXELS (and within twice it): read, with one kd line naming the file,
    in place of Pillow's DecompressionBombWarning."""
    import warnings

    flat("RGB", (1, 2, 3)).save(tmp_path / "big.png")
    flat("RGB", (1, 2, 3)).save(tmp_path / "big.bmp")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIZE * SIZE - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a library warning would fail here
        for name in ("big.png", "big.bmp"):
            assert decode_rgb(str(tmp_path / name)).shape == (3, SIZE, SIZE)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("kd: warning: image ") for line in lines)
    assert "big.png" in lines[0] and "over Pillow's limit" in lines[0] and "big.bmp" in lines[1]
