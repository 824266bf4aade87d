"""Finding the teacher for `kd distill`: a given run/file, or `auto`: the newest complete teacher
run trained on the same data (same data fingerprint) with the same architecture, trained first by
`kd train-teacher` when there is none."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn

from kd_cli.data import DataSplits
from kd_cli.engine.artifacts import META, ModelSpec, load_model
from kd_cli.engine.files import read_json
from kd_cli.engine.rundir import ENV, is_complete, read_summary
from kd_cli.errors import KdError
from kd_cli.stages.common import model_options

log = logging.getLogger("kd")

# Overrides of a distill command that also shape its auto-trained teacher.
TEACHER_OVERRIDE_KEYS = ("dataset", "teacher", "trainer", "optim", "augmentation", "seed", "paths", "debug", "logger",
                         "experiment")


def resolve_teacher(cfg: DictConfig, data: DataSplits, device: torch.device) -> tuple[nn.Module, ModelSpec, Path]:
    source = cfg.teacher.checkpoint
    if not source:
        raise KdError("distill needs a teacher: set teacher.checkpoint=RUN_DIR, a model.safetensors file, or auto")
    if source == "auto":
        path = find_teacher_run(cfg, data) or train_teacher(cfg)
    else:
        path = Path(source)
    model, spec = load_model(path, device)
    check_teacher_fits(spec, data, path)
    return model, spec, path


def find_teacher_run(cfg: DictConfig, data: DataSplits) -> Path | None:
    wanted_kwargs = model_options(cfg.teacher)
    candidates = []
    for meta in Path(cfg.paths.outputs).glob("**/" + META):
        run = meta.parent
        summary = read_summary(run)
        if not is_complete(run) or summary.get("role") != "teacher":
            continue
        spec = read_json(meta)
        env = read_json(run / ENV) if (run / ENV).exists() else {}
        if (spec.get("arch"), spec.get("kwargs"), env.get("data_fingerprint")) == (
            cfg.teacher.arch, wanted_kwargs, data.fingerprint
        ):
            candidates.append((meta.stat().st_mtime, run))
    if not candidates:
        return None
    run = max(candidates)[1]
    log.info(f"teacher: {cfg.teacher.arch} from {run} (newest complete teacher run on this data)")
    return run


def train_teacher(cfg: DictConfig) -> Path:
    """Run `kd train-teacher` with this command's data/teacher/trainer overrides, in a subprocess,
    so the teacher gets a run directory of its own, like any other run."""
    run_dir = Path(cfg.paths.outputs) / "train-teacher" / time.strftime("%Y-%m-%d") / time.strftime(
        f"%H-%M-%S-{os.getpid()}"
    )
    args = [sys.executable, "-m", "kd_cli", "train-teacher", *_teacher_overrides(), f"hydra.run.dir={run_dir}"]
    log.info(f"teacher: no complete {cfg.teacher.arch} teacher for this data under {cfg.paths.outputs}; "
             f"training one first: kd {' '.join(args[3:])}")
    done = subprocess.run(args, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0 or not is_complete(run_dir):
        reason = done.stderr.strip().splitlines()[-1].removeprefix("kd: error: ") if done.stderr.strip() else "?"
        raise KdError(f"training the teacher failed: {reason} (run directory {run_dir})")
    return run_dir


def _teacher_overrides() -> list[str]:
    hydra = HydraConfig.get()
    overrides = [o for o in hydra.overrides.task
                 if o.lstrip("+~").split("=")[0].split(".")[0] in TEACHER_OVERRIDE_KEYS
                 and not o.lstrip("+~").startswith("teacher.checkpoint")]
    user_dirs = [s.path for s in hydra.runtime.config_sources if s.provider == "command-line" and s.schema == "file"]
    # method=none last: a preset (experiment=...) may pick a distillation method for the student.
    config_dirs = [arg for d in user_dirs for arg in ("-cd", d)]
    return [*config_dirs, *overrides, "method=none"]


def check_teacher_fits(spec: ModelSpec, data: DataSplits, path: Path) -> None:
    wanted = (data.num_classes, data.in_channels)
    if (spec.num_classes, spec.in_channels) != wanted:
        raise KdError(
            f"teacher {path} was trained for {spec.num_classes} classes and {spec.in_channels} channel(s) "
            f"({spec.dataset}) but this data set has {wanted[0]} and {wanted[1]}; give a teacher trained on it"
        )
