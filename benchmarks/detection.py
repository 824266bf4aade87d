"""Detection distillation throughput: kd's engine against a hand-written torchvision training loop, same run.

Both train the same detector student (its own FCOS losses) from the same teacher with PKD on the FPN levels,
on the digit detection scenes (1x48x48, 10 classes) held on the device, with the same augmentation (a shift
of up to 4 px, the boxes moved with it). The plain loop hooks the student's backbone and runs the teacher's
backbone on the same input, as kd's method does.

    python benchmarks/detection.py                          # kd_fcos -> kd_fcos_tiny on the CPU
    python benchmarks/detection.py --device cuda --scenes 4096
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from throughput import optim_cfg, trainer_cfg

from kd_cli.data import Augmentation, load_dataset, make_loader
from kd_cli.data.base import BoxSplit
from kd_cli.data.box_loader import augment_boxes
from kd_cli.data.loader import epoch_seed
from kd_cli.engine.device import resolve_precision
from kd_cli.engine.loop import Training, fit
from kd_cli.engine.rundir import RunDir
from kd_cli.methods import build_method
from kd_cli.methods.pkd import pkd_loss
from kd_cli.models import create_model
from kd_cli.tasks import get_task

MEAN, STD = [0.0949], [0.2299]
SPEC = Augmentation(crop_padding=4)
TASK = get_task("detection")


def models(args, device, classes: int, size: int):
    torch.manual_seed(0)
    teacher = create_model(args.teacher, classes, 1, size).to(device).eval().requires_grad_(False)
    student = create_model(args.student, classes, 1, size).to(device)
    return teacher, student


def kd_engine(args, device, data: BoxSplit, classes: int) -> float:
    teacher, student = models(args, device, classes, data.images.shape[-1])
    method = build_method({"name": "pkd", "pkd_weight": 1.0, "det_loss_scale": 1.0}, student, teacher, task="detection")
    loader = dict(mean=MEAN, std=STD, device=device, seed=0)
    train = make_loader(data, batch_size=args.batch, train=True, spec=SPEC, drop_last=True, **loader)
    few = BoxSplit(data.images[:8], data.boxes[:8], data.labels[:8], data.image_ids[:8])
    tiny_test = make_loader(few, batch_size=8, train=False, spec=None, **loader)
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


def plain_loop(args, device, data: BoxSplit, classes: int) -> float:
    """The same work by hand: shuffle, shift with boxes, student losses + PKD on the FPN levels, SGD step."""
    teacher, student = models(args, device, classes, data.images.shape[-1])
    levels = ("p2", "p3", "p4")  # kd_fcos's; a 1x1 conv from the student's FPN width to the teacher's, as pkd does
    width_s, width_t = student.detector.backbone.out_channels, teacher.detector.backbone.out_channels
    connectors = torch.nn.ModuleDict({name: torch.nn.Conv2d(width_s, width_t, 1) for name in levels}).to(device)
    parameters = [*student.parameters(), *connectors.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.05, momentum=0.9, weight_decay=5e-4)
    images = data.images.to(device)
    boxes = [b.to(device) for b in data.boxes]
    labels = [lab.to(device) for lab in data.labels]
    mean = torch.tensor(MEAN, device=device).view(1, 1, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 1, 1, 1)
    captured = {}
    student.detector.backbone.register_forward_hook(lambda m, a, out: captured.update(x=a[0], levels=out))
    steps = len(images) // args.batch
    seen, seconds = 0, 0.0
    for epoch in range(args.epochs):
        generator = torch.Generator(device=device).manual_seed(epoch_seed(0, epoch, "augment"))
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch)).tolist()
        start = time.perf_counter()
        for step in range(steps):
            index = order[step * args.batch : (step + 1) * args.batch]
            x, moved = augment_boxes(images[index], [boxes[i] for i in index], SPEC, generator)
            targets = []
            for i, b in zip(index, moved):
                kept = labels[i] if b.shape[1] == 4 else labels[i][b[:, 4].long()]
                targets.append({"boxes": b[:, :4].contiguous(), "labels": kept})
            losses = student((x - mean) / std, targets)
            with torch.no_grad():
                teacher_levels = teacher.detector.backbone(captured["x"])
            loss = sum(losses.values()) + sum(
                pkd_loss(connectors[name](s), teacher_levels[name]) for name, s in captured["levels"].items()
            )
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
    parser.add_argument("--teacher", default="kd_fcos")
    parser.add_argument("--student", default="kd_fcos_tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--scenes", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the medians are compared")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = load_dataset({"name": "digit_detection", "train_scenes": args.scenes, "test_scenes": 8})
    assert isinstance(data.train, BoxSplit)
    kd_runs, plain_runs = [], []
    for _ in range(args.repeats):  # alternate, so a slow spell of the machine hits both
        plain_runs.append(plain_loop(args, device, data.train, data.num_classes))
        kd_runs.append(kd_engine(args, device, data.train, data.num_classes))
    kd_rate, plain_rate = sorted(kd_runs)[len(kd_runs) // 2], sorted(plain_runs)[len(plain_runs) // 2]
    print(f"detection distill ({args.teacher} -> {args.student}, pkd, batch {args.batch}, {device}):")
    print(f"  plain PyTorch loop  {plain_rate:8.1f} images/s")
    print(f"  kd engine           {kd_rate:8.1f} images/s   ratio {kd_rate / plain_rate:.3f}")


if __name__ == "__main__":
    main()
