"""A stage's set-up: every value checked, then seed, device, precision and process group (writes nothing);
the config printed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kd_cli.engine.device import (
    evaluation_precision,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from kd_cli.engine.distributed import World, init_distributed


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype  # training's autocast dtype
    world: World
    eval_dtype: torch.dtype  # evaluation's (device.evaluation_precision)


def setup_run(cfg: DictConfig) -> Setup:
    """Every value checked, then seed, device, precision, process group. Writes nothing."""
    from hydra.core.hydra_config import HydraConfig

    from kd_cli.stages.checks import check_config

    check_config(cfg, list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [])
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    dtype = resolve_precision(cfg.trainer.precision, device)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    world = init_distributed(device)
    return Setup(device, dtype, world, evaluation_precision(cfg.trainer.precision, device, dtype))


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
