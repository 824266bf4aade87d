"""Segmentation distillation throughput: kd's engine against a hand-written PyTorch loop, same run.

Both train the same student from the same teacher with pixel-wise KD (temperature 1) + cross-entropy
over the non-ignored pixels, on the digit scenes (1x48x48, 11 classes) held on the device, with the
same joint augmentation of image and mask (crop with padding, the mask padded with the ignore index).

    python benchmarks/segmentation.py                       # segcnn -> segcnn_tiny on the CPU
    python benchmarks/segmentation.py --teacher deeplabv3_mobilenet_v3_large --student lraspp_mobilenet_v3_large
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from throughput import optim_cfg, trainer_cfg

from kd_cli.data import Augmentation, load_dataset, make_loader
from kd_cli.data.augment import augment_pair
from kd_cli.data.base import TensorSplit
from kd_cli.data.loader import epoch_seed
from kd_cli.engine.device import resolve_precision
from kd_cli.engine.loop import Training, fit
from kd_cli.engine.rundir import RunDir
from kd_cli.methods import build_method
from kd_cli.methods.pixel_kd import pixel_kd_loss
from kd_cli.models import create_model
from kd_cli.tasks import IGNORE_INDEX, get_task

MEAN, STD = [0.0949], [0.2299]
SPEC = Augmentation(crop_padding=4)
TASK = get_task("segmentation")


def models(args, device, classes: int, size: int):
    torch.manual_seed(0)
    teacher = create_model(args.teacher, classes, 1, size).to(device).eval().requires_grad_(False)
    student = create_model(args.student, classes, 1, size).to(device)
    return teacher, student


def kd_engine(args, device, data: TensorSplit, classes: int) -> float:
    teacher, student = models(args, device, classes, data.images.shape[-1])
    method = build_method(
        {"name": "pixel_kd", "temperature": 1.0, "kd_weight": 1.0, "ce_weight": 1.0},
        student,
        teacher,
        task="segmentation",
    )
    loader = dict(mean=MEAN, std=STD, device=device, seed=0)
    train = make_loader(data, batch_size=args.batch, train=True, spec=SPEC, drop_last=True, **loader)
    tiny_test = make_loader(
        TensorSplit(data.images[:8], data.labels[:8]), batch_size=8, train=False, spec=None, **loader
    )
    with tempfile.TemporaryDirectory() as tmp:
        job = Training(
            method,
            train,
            tiny_test,
            optim_cfg(),
            trainer_cfg(args),
            device,
            resolve_precision("fp32", device),
            RunDir(tmp),
            "bench",
            task=TASK,
            num_classes=classes,
        )
        result = fit(job)
    rows = result.history[args.warmup_epochs :]
    return sum(r["images_per_s"] * r["seconds"] for r in rows) / sum(r["seconds"] for r in rows)


def plain_loop(args, device, data: TensorSplit, classes: int) -> float:
    """The same work by hand: shuffle, joint augmentation, teacher forward, pixel KD + CE, SGD step."""
    teacher, student = models(args, device, classes, data.images.shape[-1])
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    images, masks = data.images.to(device), data.labels.to(device)
    mean = torch.tensor(MEAN, device=device).view(1, 1, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 1, 1, 1)
    steps = len(masks) // args.batch
    seen, seconds = 0, 0.0
    for epoch in range(args.epochs):
        generator = torch.Generator(device=device).manual_seed(epoch_seed(0, epoch, "augment"))
        order = torch.randperm(len(masks), generator=torch.Generator().manual_seed(epoch)).to(device)
        start = time.perf_counter()
        for step in range(steps):
            index = order[step * args.batch : (step + 1) * args.batch]
            x, y = augment_pair(images[index], masks[index], SPEC, generator)
            x, y = (x - mean) / std, y.long()
            logits = student(x)
            with torch.no_grad():
                teacher_logits = teacher(x)
            valid = y != IGNORE_INDEX
            ce = torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
            loss = pixel_kd_loss(logits, teacher_logits, 1.0, valid) + ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if epoch >= args.warmup_epochs:
            seconds += time.perf_counter() - start
            seen += steps * args.batch
    return seen / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher", default="segcnn")
    parser.add_argument("--student", default="segcnn_tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--scenes", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the medians are compared")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = load_dataset({"name": "digit_scenes", "train_scenes": args.scenes, "test_scenes": 8})
    kd_runs, plain_runs = [], []
    for _ in range(args.repeats):  # alternate, so a slow spell of the machine hits both
        plain_runs.append(plain_loop(args, device, data.train, data.num_classes))
        kd_runs.append(kd_engine(args, device, data.train, data.num_classes))
    kd_rate, plain_rate = sorted(kd_runs)[len(kd_runs) // 2], sorted(plain_runs)[len(plain_runs) // 2]
    print(f"segmentation distill ({args.teacher} -> {args.student}, pixel_kd, batch {args.batch}, {device}):")
    print(f"  plain PyTorch loop  {plain_rate:8.1f} images/s")
    print(f"  kd engine           {kd_rate:8.1f} images/s   ratio {kd_rate / plain_rate:.3f}")


if __name__ == "__main__":
    main()
