"""The Hydra stages: one row each in STAGES, one module each with `main(cfg, run)`. `run(cfg)` picks the
stage from `cfg.stage`, so a saved config replays the stage it was written by, whatever command line
loads it. A new stage is one row here, its module and its primary config (configs/NAME.yaml)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from omegaconf import DictConfig


@dataclass(frozen=True)
class Stage:
    """What kd knows of a stage, read by the CLI, resume= and kd reproduce."""

    config: str  # its primary config, configs/CONFIG.yaml
    module: str  # kd_cli.stages.MODULE, whose main(cfg, run) runs it
    summary: str  # its line in `kd`'s list of stages
    trains: bool = False  # it runs the training loop: metrics.csv per epoch (reproduce compares each epoch)
    resumes: bool = False  # its config has `resume` (a stopped run continues)
    reproducible: bool = False  # kd reproduce reruns it and compares its metrics


TRAINING = dict(trains=True, resumes=True, reproducible=True)
STAGES: dict[str, Stage] = {
    "train-teacher": Stage("train_teacher", "train_teacher", "train a teacher network on a data set", **TRAINING),
    "distill": Stage("distill", "distill", "train a student from a teacher with a distillation method", **TRAINING),
    "evaluate": Stage(
        "evaluate", "evaluate", "score a trained model: accuracy, calibration, size, MACs, latency", reproducible=True
    ),
    "compress": Stage(
        "compress", "compress", "prune / low-rank / int8 a trained model, recover it with KD, measure it", resumes=True
    ),
    "export": Stage("export", "export", "write a model as ONNX or TorchScript, checked against PyTorch"),
    "import": Stage(
        "import", "import_model", "turn a checkpoint you have (.pt/.pth, safetensors, HF folder) into a kd model"
    ),
}


def run(cfg: DictConfig) -> float | None:
    from kd_cli.errors import unknown_choice

    if cfg.stage not in STAGES:
        raise unknown_choice("stage", cfg.stage, STAGES)
    if not plain_values_pass(cfg):
        return None
    try:  # (importing a stage imports torch: seconds in which Ctrl-C must not leave Hydra's folder behind)
        from kd_cli.stages.lifecycle import guarded

        stage = import_module(f"kd_cli.stages.{STAGES[cfg.stage].module}")
    except KeyboardInterrupt:
        _remove_empty_run_dir()
        raise
    return guarded(stage.main, cfg)


def _remove_empty_run_dir() -> None:
    from hydra.core.hydra_config import HydraConfig

    with contextlib.suppress(OSError):
        Path(HydraConfig.get().runtime.output_dir).rmdir()  # removes only an empty directory


def plain_values_pass(cfg: DictConfig) -> bool:
    """A single run's plain values (trainer, optimiser, ...) are checked before torch and the stage
    are imported, so a typo is answered at once. A refused run's error is handed to the CLI (as
    `guarded` does) and the run directory Hydra made for it removed again (it is empty). A sweep checks
    every job before the first one starts (sweep_status.py)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from kd_cli.errors import hand_over
    from kd_cli.stages.checks import check_plain_values

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return True
    try:
        check_plain_values(cfg)
    except Exception as error:
        _remove_empty_run_dir()
        hand_over(error)
        return False
    return True
