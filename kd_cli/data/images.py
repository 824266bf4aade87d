"""Reading an image file: the one way every part of kd turns a file into pixels.

Training batches, evaluation, `kd predict` and the unreadable-file scan all call `decode_rgb`, so an
image is the same uint8 RGB array wherever it is read. JPEG and PNG are decoded in C++ (TorchCodec when
installed, else torchvision.io); every other raster format, and anything those decoders refuse, by
Pillow (`read_rgb`). Where the decoders would disagree, one rule is applied:
- 16-bit samples (PNG, TIFF, PGM) keep their high byte (`>> 8`, as libpng's strip-16 and Pillow's own
  16-bit RGB reading do): a 16-bit PNG always goes through torchvision.io, which returns the 16-bit
  values, and Pillow's 16-bit grey modes are shifted instead of clipped to white; float samples (a float
  TIFF) in [0, 1] are scaled to 0..255 (Pillow truncated them to black), others taken as 0..255;
- palette images take their palette's colours, grey + alpha and RGBA drop the alpha, CMYK JPEGs are
  converted to RGB (all three decoders agree on these; tests/test_images.py holds them to it).

Safety: Pillow picks its decoder from the file's contents, not its name, and its EPS decoder runs
Ghostscript on the file; `read_rgb` opens only the raster formats ImageFolder's extensions stand for
(JPEG/MPO, PNG, PPM/PGM, BMP, TIFF, WebP). Only files whose header says JPEG or PNG reach the C++
decoders, and only within Pillow's decompression-bomb limit. Images over Pillow's MAX_IMAGE_PIXELS
are read with one kd warning naming the file; over twice that they are unreadable files.
"""

from __future__ import annotations

import functools
import os
import struct
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kd_cli.data.on_disk import brief, shown_path
from kd_cli.errors import KdError, warn

# Pillow's names of the formats behind ImageFolder's extensions (.jpg .jpeg .png .ppm .pgm .bmp .tif .tiff
# .webp); camera JPEGs that Pillow calls MPO are opened by its JPEG entry.
FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG start-of-frame markers (baseline, extended, progressive, lossless, ...): they carry the size.
SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes of 16-bit grey images


class UnreadableImage(KdError):
    """An image file that cannot be decoded; the message is one line naming it.

    torch re-raises a DataLoader worker's exception as `type(error)(long message with the worker's
    traceback)`: the constructor keeps only this class's own line of that message."""

    def __init__(self, message: str):
        lines = [line for line in str(message).splitlines() if line.strip()]
        if len(lines) > 1:
            marker = f"{type(self).__name__}: "
            ours = [line.split(marker, 1)[1] for line in lines if marker in line]
            message = ours[-1].strip() if ours else lines[-1].strip()
        super().__init__(message)

    problem = ""  # what is wrong with the file, when known (`of`)

    @classmethod
    def of(cls, path: str, problem: str) -> UnreadableImage:
        error = cls(
            f"cannot read image {shown_path(path)} ({problem}); replace or delete it, or set "
            "dataset.skip_unreadable=true to leave unreadable images out"
        )
        error.problem = problem
        return error


def decode_rgb(path: str) -> torch.Tensor:
    """The image at `path` as uint8 (3, H, W); any failure is an `UnreadableImage` naming the file."""
    data = _read_bytes(path)
    size = header_size(data)
    if size is not None and 0 < size[0] * size[1] <= _max_pixels():
        _warn_if_large(path, size[0] * size[1])
        try:
            if _is_16_bit_png(data):
                image = _torchvision_decoder()(torch.frombuffer(data, dtype=torch.uint8))
                image = (image.to(torch.int32) >> 8).to(torch.uint8)
            else:
                image = image_decoder()(torch.frombuffer(data, dtype=torch.uint8))
            if image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3:
                return image
        except Exception:  # noqa: BLE001 - Pillow decides, and names the problem in one line
            pass
    return torch.from_numpy(np.array(read_rgb(path))).permute(2, 0, 1).contiguous()


def grey(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (1, H, W) by ITU-R 601-2 luma in integers, as Pillow's convert("L"):
    a grey image read as RGB comes back exactly."""
    r, g, b = image.to(torch.int32).unbind(0)
    return ((r * 299 + g * 587 + b * 114 + 500) // 1000).to(torch.uint8)[None]


def _read_bytes(path: str) -> bytearray:
    try:
        with open(path, "rb", buffering=0) as file:
            data = bytearray(os.fstat(file.fileno()).st_size)  # read straight into a buffer torch can share
            read = file.readinto(data)
            return data if read == len(data) else data[:read]
    except OSError as error:
        raise UnreadableImage.of(path, error.strerror or str(error)) from None


def read_rgb(path: str) -> Image.Image:
    """The image as an RGB Pillow image, fully decoded, by the rules above; any failure is an
    `UnreadableImage`. (`decode_rgb` is what kd reads images with; this is its Pillow half.)"""
    try:
        with open(path, "rb") as file, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # said in kd's words below
            image: Image.Image = Image.open(file, formats=_formats())
            _warn_if_large(path, image.width * image.height)
            if image.mode in SIXTEEN_BIT_MODES:  # Pillow's convert would clip them to 255
                image = Image.fromarray(_high_byte(np.array(image)), "L")
            elif image.mode == "F":  # float samples: Pillow would truncate 0..1 values to black
                image = Image.fromarray(_float_to_byte(np.array(image)), "L")
            return image.convert("RGB")  # decodes every pixel (Image.open reads the header only)
    except Exception as error:  # noqa: BLE001 - whatever the decoder raises, the file is the problem
        raise UnreadableImage.of(path, _problem(error)) from None


def _float_to_byte(values: np.ndarray) -> np.ndarray:
    """Float samples (a float TIFF): the 0..1 convention scaled to 0..255 when every value is in [0, 1],
    else taken as 0..255 values; NaN as 0, rounded and clipped."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0 and values.max() <= 1:
        values = values * 255
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _high_byte(values: np.ndarray) -> np.ndarray:
    return (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def header_size(data: bytes | bytearray) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's start-of-frame; None for anything else."""
    if data.startswith(PNG_MAGIC) and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack_from(">II", data, 16)
    if not data.startswith(JPEG_MAGIC):
        return None
    position = 2
    while position + 9 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        if marker in SOF_MARKERS:
            height, width = struct.unpack_from(">HH", data, position + 5)
            return width, height
        position += 2 + length
    return None


def _is_16_bit_png(data: bytes | bytearray) -> bool:
    return data.startswith(PNG_MAGIC) and len(data) > 24 and data[24] == 16  # IHDR's bit depth


@functools.cache
def image_decoder() -> Callable[[torch.Tensor], torch.Tensor]:
    """encoded bytes -> uint8 (3, H, W): TorchCodec's decoder when it is installed (`kd-cli[images]`;
    the successor of torchvision.io's image decoders, which torchvision 0.29 deprecates), else
    torchvision.io's."""
    try:
        from torchcodec.decoders import decode_image as codec_decode

        return lambda data: codec_decode(data, mode="RGB")
    except ImportError:
        return _torchvision_decoder()


@functools.cache
def _torchvision_decoder() -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision.io's decoder (16-bit PNGs come back as uint16); its deprecation warning, one per
    decoded image, is silenced here."""
    from torchvision.io import ImageReadMode, decode_image

    warnings.filterwarnings(
        "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
    )
    return lambda data: decode_image(data, mode=ImageReadMode.RGB)


def _max_pixels() -> int:
    limit = Image.MAX_IMAGE_PIXELS
    return 2 * int(limit) if limit else 2**62


_warned_large: set[str] = set()


def _warn_if_large(path: str, pixels: int) -> None:
    """Pillow's decompression-bomb warning, in kd's words, once per file and process."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and pixels > limit and path not in _warned_large:
        _warned_large.add(path)
        warn(
            f"image {shown_path(path)} has {pixels:,} pixels, over Pillow's limit of {int(limit):,} for "
            "untrusted files; it is read (images over twice the limit are refused): check that the file "
            "is what you meant to give, or shrink it"
        )


@functools.cache
def _formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin; a format this Pillow was built without is left out
    return tuple(name for name in FORMATS if name in Image.OPEN)


def _problem(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not a JPEG, PNG, PPM/PGM, BMP, TIFF or WebP image, or its header is damaged"
    return brief(error, limit=120)


def problem_of(path: str) -> str | None:
    """None when `path` decodes, else what is wrong with it (the scan of `dataset.skip_unreadable`)."""
    try:
        decode_rgb(path)
    except UnreadableImage as error:
        return error.problem or str(error)
    return None
