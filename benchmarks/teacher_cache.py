"""The teacher cache on a temperature sweep, measured in one run on this machine.

Four distillations (method=kd, temperatures 1, 2, 4, 8) of one student from one teacher on one data
stream, with and without the teacher cache, against what they must cost at least: four trainings of
the student alone (method=none) plus one pass of the teacher over the stream. Every job runs kd's own
loop (`engine.loop.fit`, what `kd distill -m method.temperature=1,2,4,8` runs per job) in fp32, and the
cached sweep's metrics are compared with the uncached sweep's, epoch by epoch.

    python benchmarks/teacher_cache.py                         # resnet56 -> resnet20, CIFAR-shaped
    python benchmarks/teacher_cache.py --teacher resnet32x4 --student resnet8x4 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from throughput import MEAN, SPEC, STD, cifar_like, optim_cfg, trainer_cfg

from kd_cli.data import make_loader
from kd_cli.engine.device import autocast, resolve_precision
from kd_cli.engine.loop import Training, fit
from kd_cli.engine.rundir import RunDir
from kd_cli.engine.teacher_cache import TeacherCache, teacher_identity
from kd_cli.methods import build_method
from kd_cli.models import create_model

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
TIMING = ("images_per_s", "seconds")


def loader(args, device, data):
    return make_loader(
        data, batch_size=args.batch, train=True, spec=SPEC, mean=MEAN, std=STD, device=device, seed=0, drop_last=True
    )


def one_job(args, device, data, teacher, method_cfg, cache_dir: Path | None) -> tuple[float, list[dict]]:
    torch.manual_seed(1)
    student = create_model(args.student, 100, 3, 32).to(device)
    method = build_method(method_cfg, student, teacher if method_cfg["name"] != "none" else None)
    train = loader(args, device, data)
    test = make_loader(data, batch_size=512, train=False, spec=None, mean=MEAN, std=STD, device=device, seed=0)
    dtype = resolve_precision(args.precision, device)
    cache = None
    if cache_dir is not None:
        cache = TeacherCache(
            cache_dir,
            {"teacher": teacher_identity(teacher), "stream": train.stream_identity(), "precision": str(dtype)},
            max_bytes=2**34,
        )
    with tempfile.TemporaryDirectory() as run:
        job = Training(
            method,
            train,
            test,
            optim_cfg(),
            trainer_cfg(args, args.precision, False),
            device,
            dtype,
            RunDir(run),
            "bench",
            teacher_cache=cache,
        )
        start = time.perf_counter()
        result = fit(job)
        seconds = time.perf_counter() - start
    return seconds, [{k: v for k, v in row.items() if k not in TIMING} for row in result.history]


def teacher_pass(args, device, data, teacher) -> float:
    """The teacher's forward passes over every epoch of the stream, and nothing else."""
    train = loader(args, device, data)
    dtype = resolve_precision(args.precision, device)
    start = time.perf_counter()
    with torch.no_grad():
        for epoch in range(args.epochs):
            train.set_epoch(epoch)
            for images, _ in train:
                with autocast(device, dtype):
                    teacher(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = cifar_like(args.samples)
    torch.manual_seed(0)
    teacher = create_model(args.teacher, 100, 3, 32).to(device).eval().requires_grad_(False)
    kd = [
        {"name": "kd", "temperature": t, "kd_weight": 0.9, "ce_weight": 0.1, "logit_standardization": False}
        for t in TEMPERATURES
    ]
    none = {"name": "none", "ce_weight": 1.0, "label_smoothing": 0.0}
    print(
        f"device {device}, {args.teacher} -> {args.student}, batch {args.batch}, {args.samples} CIFAR-shaped "
        f"images, {args.epochs} epochs per job, {len(TEMPERATURES)} temperatures, {args.precision}"
    )
    plain = [one_job(args, device, data, teacher, cfg, None) for cfg in kd]
    with tempfile.TemporaryDirectory() as cache_dir:
        cached = [one_job(args, device, data, teacher, cfg, Path(cache_dir)) for cfg in kd]
    alone = [one_job(args, device, data, teacher, none, None)[0] for _ in TEMPERATURES]
    once = teacher_pass(args, device, data, teacher)
    floor = sum(alone) + once
    for name, seconds in (
        ("sweep without cache", sum(s for s, _ in plain)),
        ("sweep with cache", sum(s for s, _ in cached)),
        ("4 student-only + 1 teacher pass", floor),
    ):
        print(f"{name:<34} {seconds:8.1f} s   {seconds / floor:.2f}x the floor")
    print(f"  jobs with cache: {', '.join(f'{s:.1f} s' for s, _ in cached)} (the first fills it)")
    same = all(p == c for (_, p), (_, c) in zip(plain, cached))
    print(f"metrics with cache == without: {same}   (aim: True, and the cached sweep <= 1.2x the floor)")


if __name__ == "__main__":
    main()
