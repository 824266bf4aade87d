"""kd's image-folder pipeline against torchvision's DataLoader + PIL on a folder of real JPEGs.

The JPEGs are real handwriting: the MNIST test set when `../shared/data/mnist-t10k` is beside the
repository (else scikit-learn's digits), upscaled to --side pixels and saved as JPEG files in class
folders. Both pipelines read the same files with the same number of worker processes and give
normalised float batches of random-resized crops, flipped at random:

- torchvision: ImageFolder (PIL decode) -> RandomResizedCrop -> RandomHorizontalFlip -> ToTensor ->
  Normalize, per image in the workers (the usual recipe);
- kd: `make_loader` on `dataset=imagefolder` (`augmentation=standard`), what `kd distill` trains from.

    python benchmarks/image_folder.py                  # 4,000 images, 64 px, crops of 32, 2 workers
    python benchmarks/image_folder.py --images 20000 --side 128 --size 112 --workers 8
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
MNIST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist-t10k"


def handwriting(count: int) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz"
    if images_file.exists() and labels_file.exists():
        with gzip.open(images_file) as handle:
            images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(labels_file) as handle:
            labels = np.frombuffer(handle.read(), np.uint8, offset=8)
        return images[:count], labels[:count]
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    reps = -(-count // len(images))
    return np.tile(images, (reps, 1, 1))[:count], np.tile(digits.target, reps)[:count]


def write_jpegs(root: Path, count: int, side: int) -> str:
    images, labels = handwriting(count)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").resize((side, side), Image.BILINEAR).save(
            folder / f"{i:05d}.jpg", quality=90
        )
    return "MNIST test set" if MNIST.exists() else "scikit-learn digits"


def torchvision_loader(root: Path, args):
    from torchvision import datasets
    from torchvision import transforms as T

    transform = T.Compose(
        [T.RandomResizedCrop(args.size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )


def kd_loader(root: Path, args):
    from kd_cli.data import Augmentation, load_dataset, make_loader

    data = load_dataset(
        {"name": "imagefolder", "root": str(root), "image_size": args.size, "test_fraction": 0.01, "val_fraction": 0.0}
    )
    return make_loader(
        data.train,
        batch_size=args.batch,
        train=True,
        spec=Augmentation(crop_padding=4, hflip=True),
        mean=MEAN,
        std=STD,
        device=torch.device("cpu"),
        seed=0,
        drop_last=True,
        num_workers=args.workers,
    )


def images_per_s(loader, epochs: int) -> float:
    seen, seconds = 0, 0.0
    for epoch in range(epochs + 1):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        start, count = time.perf_counter(), 0
        for images, _ in loader:
            count += len(images)
        if epoch > 0:  # the first epoch starts the workers
            seconds += time.perf_counter() - start
            seen += count
    return seen / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--side", type=int, default=64, help="side of the JPEG files")
    parser.add_argument("--size", type=int, default=32, help="side of the crops the model sees")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source = write_jpegs(Path(folder), args.images, args.side)
        print(
            f"{args.images} JPEGs of {args.side} px ({source}), crops of {args.size}, batch {args.batch}, "
            f"{args.workers} workers, {torch.get_num_threads()} threads"
        )
        runs: dict[str, list[float]] = {"torchvision": [], "kd": []}
        for _ in range(2):  # alternate, keep the best of each
            runs["torchvision"].append(images_per_s(torchvision_loader(Path(folder), args), args.epochs))
            runs["kd"].append(images_per_s(kd_loader(Path(folder), args), args.epochs))
    best = {name: max(values) for name, values in runs.items()}
    print(f"torchvision DataLoader + PIL  {best['torchvision']:10.0f} images/s")
    print(f"kd image-folder loader        {best['kd']:10.0f} images/s")
    print(f"ratio kd / torchvision = {best['kd'] / best['torchvision']:.2f}x   (aim >= 2x on a CPU)")


if __name__ == "__main__":
    main()
