"""Writers and readers of real on-disk data-set formats (MNIST's IDX, CIFAR's pickled batches),
shared by the tests. The real MNIST test set lives in shared/ beside the repository."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
from torchvision import datasets as tv

REPO = Path(__file__).resolve().parents[1]
MNIST_T10K = Path(os.environ.get("KD_MNIST_T10K", REPO.parent / "shared" / "data" / "mnist-t10k"))


def load_mnist_t10k() -> tuple[np.ndarray, np.ndarray]:
    _, images = read_idx(MNIST_T10K / "t10k-images-idx3-ubyte.gz")
    _, labels = read_idx(MNIST_T10K / "t10k-labels-idx1-ubyte.gz")
    return images, labels


def read_idx(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return shape, np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)  # 0x08: unsigned bytes
    path.write_bytes(magic + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def write_mnist_raw(root: Path, images: np.ndarray, labels: np.ndarray, folder: str = "MNIST", n_train: int = 7000):
    """A raw folder as torchvision's download leaves it: the four unzipped IDX files."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, part in (("train", slice(None, n_train)), ("t10k", slice(n_train, None))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[part])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[part])


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(obj, file, protocol=2)  # the protocol the official files use


def cifar_batch(
    rng: np.random.Generator, count: int, classes: int, label_key: str, labels: list[int] | None = None
) -> tuple[dict, np.ndarray]:
    """One batch in CIFAR's python format: rows of 3072 bytes, the R, G then B planes of a 32x32 image.
    `labels`: the labels to draw from (default: every class)."""
    hwc = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    batch = {
        "batch_label": "written by tests",
        label_key: (rng.choice(labels, count) if labels else rng.integers(0, classes, count)).tolist(),
        "data": hwc.transpose(0, 3, 1, 2).reshape(count, 3072),
        "filenames": [f"img_{i}.png" for i in range(count)],
    }
    if label_key == "fine_labels":
        batch["coarse_labels"] = [label // 5 for label in batch[label_key]]
    return batch, hwc


def write_cifar(root: Path, cls: type[tv.CIFAR10], rng: np.random.Generator) -> tuple:
    """Tiny CIFAR-10 or CIFAR-100 files; returns the train/test images (NHWC) and labels written. The test
    labels are drawn from the training labels, so every test class can be learnt (kd refuses otherwise)."""
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    classes = 100 if cls is tv.CIFAR100 else 10
    label_key = "fine_labels" if cls is tv.CIFAR100 else "labels"
    written = {}
    for name, _ in cls.train_list:
        batch, hwc = cifar_batch(rng, 6, classes, label_key)
        write_pickle(folder / name, batch)
        written[name] = (hwc, batch[label_key])
    seen = sorted({label for hwc_labels in written.values() for label in hwc_labels[1]})
    for name, _ in cls.test_list:
        batch, hwc = cifar_batch(rng, 6, classes, label_key, labels=seen)
        write_pickle(folder / name, batch)
        written[name] = (hwc, batch[label_key])
    names = [f"class_{i}" for i in range(classes)]
    meta = {"label_names": names} if classes == 10 else {"fine_label_names": names, "coarse_label_names": names[:20]}
    write_pickle(folder / cls.meta["filename"], meta)
    train = [written[name] for name, _ in cls.train_list]
    test = [written[name] for name, _ in cls.test_list]
    return *join_batches(train), *join_batches(test)


def join_batches(parts: list[tuple[np.ndarray, list]]) -> tuple[np.ndarray, list]:
    return np.concatenate([images for images, _ in parts]), sum((labels for _, labels in parts), [])


# ------------------------------------------------------------------------ image files, sound and broken


def digits_images(count: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Real handwritten digits (scikit-learn's, 8x8 upscaled to `size`), as uint8 greyscale, with labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images[:count] * (255.0 / 16.0)).astype(np.uint8)
    images = images.repeat(size // 8, axis=1).repeat(size // 8, axis=2)
    return images, bunch.target[:count].astype(np.int64)


def save_image(path: Path, array: np.ndarray, **options) -> Path:
    """`array` (H, W) or (H, W, 3) uint8 in the format the suffix names (.png, .jpg, .bmp, ...)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file short, as an interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def damage_jpeg_header(path: Path) -> Path:
    """Overwrite the bytes after a JPEG's start-of-image marker (its APP0/quantisation segments)."""
    data = bytearray(path.read_bytes())
    data[2:40] = b"\xff" * 38
    path.write_bytes(bytes(data))
    return path


class Payload:
    """Pickles to a call of `fn(*args)`: what a crafted data file would run when unpickled."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args
