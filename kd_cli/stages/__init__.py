"""One module per stage. `run(cfg)` picks the stage from `cfg.stage`, so a saved config replays
the stage it was written by, whatever command line loads it."""

from __future__ import annotations

import contextlib
from importlib import import_module
from pathlib import Path

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

    if cfg.stage not in STAGE_MODULES:
        raise unknown_choice("stage", cfg.stage, STAGE_MODULES)
    if not plain_values_pass(cfg):
        return None
    try:  # (importing a stage imports torch: seconds in which Ctrl-C must not leave Hydra's folder behind)
        from kd_cli.stages.common import guarded

        stage = import_module(STAGE_MODULES[cfg.stage])
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
