"""Device and precision: resolved once from the config, with clear errors for absent hardware."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import torch

from kd_cli.engine.values import PRECISIONS
from kd_cli.errors import KdError


def resolve_device(spec: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise KdError(f"trainer.device={spec} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        _check_cuda(device, spec)
    elif device.type == "mps" and not _mps_available():
        raise KdError("trainer.device=mps but this machine has no MPS (Apple GPU); use trainer.device=cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise KdError(f"trainer.device={spec} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def _check_cuda(device: torch.device, spec: str) -> None:
    if not torch.cuda.is_available():
        raise KdError(f"trainer.device={spec} but no CUDA GPU is available here; use trainer.device=cpu or auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise KdError(f"trainer.device={spec} but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_precision(spec: str, device: torch.device) -> torch.dtype:
    """The autocast dtype (float32 = no autocast). `auto` is bf16 on a GPU that supports it, and on a
    CPU with bf16 instructions (AMX or AVX-512-BF16); fp32 elsewhere, where bf16 would be emulated."""
    spec = str(spec).lower()
    if spec not in PRECISIONS:
        raise KdError(f"trainer.precision={spec} is not one of {', '.join(PRECISIONS)}")
    if spec == "auto":
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        cpu_bf16 = device.type == "cpu" and cpu_has_bf16_units()
        return torch.bfloat16 if gpu_bf16 or cpu_bf16 else torch.float32
    if spec == "fp16" and device.type == "cpu":
        raise KdError("trainer.precision=fp16 needs a GPU; on CPU use bf16 or fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec]


def evaluation_precision(spec: str, device: torch.device, training: torch.dtype) -> torch.dtype:
    """What evaluation runs in: as training, except that `auto` evaluates in fp32 on the CPU. There bf16
    pays for training's throughput; scoring is a small share of the time, and in fp32 the accuracies a
    run reports are those `kd evaluate` and any fp32 run of the same weights report."""
    if str(spec).lower() == "auto" and device.type == "cpu":
        return torch.float32
    return training


def cpu_has_bf16_units() -> bool:
    """AMX tiles or AVX-512-BF16 on this CPU (what oneDNN runs bf16 convolutions and matmuls on natively)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own probes (private)
    try:
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    except RuntimeError:
        return False


def use_channels_last(spec: bool | str, device: torch.device, dtype: torch.dtype) -> bool:
    """`auto`: channels_last where it was measured to pay, with bf16 on the CPU (oneDNN's bf16
    convolutions want NHWC: +16 % over bf16 alone for resnet56 -> resnet20, benchmarks/precision.py)."""
    if str(spec).lower() == "auto":
        return device.type == "cpu" and dtype == torch.bfloat16
    return str(spec).lower() == "true"


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named part of a run, from the run's seed alone."""
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def random_stream(seed: int | None, stream: str = "") -> Iterator[None]:
    """Draws made in the block (a model's initialisation, a method's adapters) come from (seed, stream)
    alone, and the global generators are left as they were: what a part of a run draws never depends
    on what was built, loaded or trained before it in the same process (a teacher found on disk or
    trained first, a dry build for the checks). `seed=None` only isolates the block."""
    import random

    python_state = random.getstate()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        if seed is not None:
            seed_everything(derived_seed(seed, stream))
        try:
            yield
        finally:
            random.setstate(python_state)
