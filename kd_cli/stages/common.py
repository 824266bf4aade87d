"""What every stage shares: the run directory's life cycle, device/data set-up, model building."""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_cli.engine.artifacts import ModelSpec
from kd_cli.engine.device import resolve_device, resolve_precision, seed_everything
from kd_cli.engine.distributed import World, init_distributed
from kd_cli.engine.rundir import COMPLETE, FAILED, INTERRUPTED, RUNNING, RunDir, read_summary
from kd_cli.errors import KdError

log = logging.getLogger("kd")


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# The first error of this process's jobs. Hydra prints its own multi-line report for an exception
# escaping a job, so jobs hand errors over here and the CLI raises this one after Hydra returns.
_errors: list[BaseException] = []


def take_error() -> BaseException | None:
    return _errors.pop(0) if _errors else None


def guarded(stage_main: Callable[[DictConfig, RunDir], Any], cfg: DictConfig) -> Any:
    """Run a stage; record `failed`/`interrupted` in summary.json when it does not complete.

    In a sweep a failed job is recorded and the others go on; the command exits non-zero at the end.
    """
    run = RunDir(output_dir())
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.time()
    try:
        return stage_main(cfg, run)
    except KeyboardInterrupt as interrupt:
        _mark(run, INTERRUPTED, started, "interrupted; continue with resume=" + str(run.path))
        _errors.append(interrupt)
        raise
    except Exception as error:
        from kd_cli.cli import one_line

        _mark(run, FAILED, started, one_line(error))
        if in_multirun():
            log.error(f"kd: error: job {run.path} failed: {one_line(error)}")
            error = KdError(f"a job of the sweep failed ({run.path}): {one_line(error)}")
        if not _errors:
            _errors.append(error)
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _mark(run: RunDir, status: str, started: float, message: str) -> None:
    summary = read_summary(run.path)
    if summary.get("status") != COMPLETE:
        summary.update(status=status, error=message, wall_time_s=time.time() - started)
        run.write_summary(**summary)


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    world: World


def check_training_config(cfg: DictConfig) -> None:
    """Impossible values, found before any data is read or any teacher is trained."""
    from kd_cli.engine.optim import check_optim
    from kd_cli.methods import METHODS
    from kd_cli.registry import check_options

    for key in ("epochs", "batch_size", "eval_batch_size", "eval_every"):
        if cfg.trainer[key] < 1:
            raise KdError(f"trainer.{key}={cfg.trainer[key]} must be at least 1")
    check_optim(cfg.optim, cfg.trainer.epochs)
    method = METHODS.get(cfg.method.name)
    options = {k: v for k, v in cfg.method.items() if k != "name"}
    check_options(f"method '{cfg.method.name}'", method, options, exclude=("student", "teacher", "num_samples"))


def setup_run(cfg: DictConfig, run: RunDir) -> Setup:
    """Seed, device, precision, process group; config and a `running` summary into the run dir."""
    if "method" in cfg:
        check_training_config(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    dtype = resolve_precision(cfg.trainer.precision, device)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    world = init_distributed(device)
    if world.is_main:
        run.write_config(cfg)
        run.write_summary(RUNNING, stage=cfg.stage, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    log.info(f"{cfg.stage}: run directory {run.path}  device {device}  precision {str(dtype).split('.')[-1]}")
    return Setup(device, dtype, world)


def print_config(cfg: DictConfig) -> None:
    """The resolved config as a tree (rich), at the start of a run."""
    from rich.console import Console
    from rich.tree import Tree

    def add(tree: Tree, node: Any) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                add(tree.add(f"[bold]{key}[/]"), value)
            else:
                tree.add(f"{key}: [cyan]{value}[/]")

    tree = Tree(f"[bold]{cfg.stage}[/] config")
    add(tree, OmegaConf.to_container(cfg, resolve=True))
    Console().print(tree)


def dataset_options(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.dataset, resolve=True)


def model_options(model_cfg: DictConfig) -> dict:
    """Every option of the model, the builder's defaults filled in: `teacher=default` with `{}` and
    `teacher=cnn` with `{width: 32, ...}` describe the same network, and model.json says so."""
    from kd_cli.config import model_options as defaults
    from kd_cli.models import MODELS

    given = OmegaConf.to_container(model_cfg.kwargs, resolve=True)
    return {**defaults(MODELS.get(model_cfg.arch)), **given}


def model_spec(model_cfg: DictConfig, data, dataset_cfg: DictConfig) -> ModelSpec:
    return ModelSpec(
        arch=model_cfg.arch,
        kwargs=model_options(model_cfg),
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        input_size=data.input_size,
        mean=list(dataset_cfg.mean),
        std=list(dataset_cfg.std),
        class_names=list(data.class_names),
        dataset=dataset_cfg.name,
    )


def count_parameters(model: nn.Module) -> int:
    """Weights and biases; int8 weights too (torch.ao packs those into buffers, not parameters)."""
    stored = [t for v in model.state_dict().values() for t in (v if isinstance(v, tuple) else (v,))
              if isinstance(t, torch.Tensor)]
    if not any(t.is_quantized for t in stored):
        return sum(p.numel() for p in model.parameters())
    return sum(t.numel() for t in stored if t.is_quantized or isinstance(t, nn.Parameter))


def check_channels(mean: list, std: list, in_channels: int) -> None:
    if len(mean) != in_channels or len(std) != in_channels:
        raise KdError(
            f"dataset.mean/std have {len(mean)}/{len(std)} values but the images have {in_channels} channel(s)"
        )
