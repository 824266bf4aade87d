"""One module per stage. `run(cfg)` picks the stage from `cfg.stage`, so a saved config replays
the stage it was written by, whatever command line loads it."""

from __future__ import annotations

from importlib import import_module

from omegaconf import DictConfig

STAGE_MODULES = {
    "train-teacher": "kd_cli.stages.train_teacher",
    "distill": "kd_cli.stages.distill",
    "evaluate": "kd_cli.stages.evaluate",
    "compress": "kd_cli.stages.compress",
    "export": "kd_cli.stages.export",
    "import": "kd_cli.stages.import_model",
}


def run(cfg: DictConfig) -> float | None:
    from kd_cli.errors import unknown_choice
    from kd_cli.stages.common import guarded

    if cfg.stage not in STAGE_MODULES:
        raise unknown_choice("stage", cfg.stage, STAGE_MODULES)
    stage = import_module(STAGE_MODULES[cfg.stage])
    return guarded(stage.main, cfg)
