"""`trainer.precision=auto` against fp32 in kd's own loop on this machine, measured in one run.

On a CPU with bf16 units (AMX or AVX-512-BF16) `auto` means bf16 autocast and channels_last
(`trainer.channels_last=auto`); elsewhere it is fp32 and the ratio is 1. A plain PyTorch loop in fp32
is timed beside them, so the figures compare with benchmarks/throughput.py.

    python benchmarks/precision.py                                  # resnet56 -> resnet20, CIFAR-shaped
    python benchmarks/precision.py --teacher resnet110 --student resnet32
"""

from __future__ import annotations

import argparse

import torch
from throughput import cifar_like, kd_engine, plain_loop

from kd_cli.engine.device import cpu_has_bf16_units, resolve_precision, use_channels_last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = resolve_precision("auto", device)
    print(
        f"device {device}, bf16 units {cpu_has_bf16_units()}, auto -> {str(dtype).split('.')[-1]}, "
        f"channels_last {use_channels_last('auto', device, dtype)}, threads {torch.get_num_threads()}, "
        f"{args.teacher} -> {args.student}, batch {args.batch}, {args.samples} CIFAR-shaped images"
    )
    data = cifar_like(args.samples)
    runs: dict[str, list[float]] = {"plain fp32": [], "kd fp32": [], "kd auto": []}
    for _ in range(2):  # alternate, keep the best of each: drift in machine load hits all alike
        runs["plain fp32"].append(plain_loop(args, device, data))
        runs["kd fp32"].append(kd_engine(args, device, data, "fp32", False))
        runs["kd auto"].append(kd_engine(args, device, data, "auto", "auto"))
    best = {name: max(values) for name, values in runs.items()}
    for name, speed in best.items():
        print(f"{name:<12} {speed:8.1f} images/s   {speed / best['plain fp32']:.2f}x plain fp32")
    print(
        f"ratio kd auto / kd fp32 = {best['kd auto'] / best['kd fp32']:.2f}x   (aim >= 1.6x on a CPU with bf16 units)"
    )


if __name__ == "__main__":
    main()
