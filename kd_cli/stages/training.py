"""Training shared by train-teacher, distill and compress: the method built with what the stage gives it
(and its dry build for the checks), the engine's one loop set up from the config, saving the trained
model (and each online peer), the teacher cache."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_cli.engine.artifacts import ModelSpec, load_model, save_model
from kd_cli.engine.device import random_stream, use_channels_last
from kd_cli.engine.loop import FitResult, Training, fit
from kd_cli.engine.rundir import PEERS, RunDir
from kd_cli.engine.teacher_cache import TeacherCache, teacher_identity
from kd_cli.engine.trackers import Trackers, open_trackers
from kd_cli.methods import build_method
from kd_cli.methods.base import Distiller
from kd_cli.stages.data import Loaders
from kd_cli.stages.lifecycle import output_dir
from kd_cli.stages.setup import Setup
from kd_cli.tasks import get_task

log = logging.getLogger("kd")


def dry_build(
    cfg: DictConfig, student: nn.Module, teacher: nn.Module | None, loaders: Loaders, online: bool = True
) -> None:
    """Build the method once with these models and drop it: every check it makes on them (layers,
    feature shapes, sizes) fails now, before a teacher is trained or the run is written. `online`:
    the stage trains several students when the method asks (kd compress does not). Its first epoch is
    started too, so a rule between the method and trainer.epochs (an initialisation phase that leaves no
    epoch to train) is refused here as well."""
    import copy

    with random_stream(None):  # built and dropped: its draws must not move the run's generators
        method = new_method(cfg, student, teacher, loaders, (lambda: copy.deepcopy(student)) if online else None)
        method.start_epoch(0, int(cfg.trainer.epochs))


def new_method(
    cfg: DictConfig,
    student: nn.Module,
    teacher: nn.Module | None,
    loaders: Loaders,
    new_student: Callable[[], nn.Module] | None,
) -> Distiller:
    """cfg.method built around `student`, with what the stage gives methods: the training split's size,
    fresh students (None: this stage trains one network), the artifact loader for teachers by path."""
    return build_method(
        cast("dict[str, Any]", OmegaConf.to_container(cfg.method, resolve=True)),
        student,
        teacher,
        num_samples=len(loaders.data.train),
        new_student=new_student,
        load_model=load_model,
        task=loaders.data.task,
    )


def training_job(
    cfg: DictConfig,
    run: RunDir,
    setup: Setup,
    loaders: Loaders,
    method: Distiller,
    title: str,
    tracker: Trackers,
    **options: Any,
) -> Training:
    """The engine's one loop, set up from the run's config (`options`: val_loader, teacher_cache)."""
    return Training(
        method=method,
        train_loader=loaders.train,
        test_loader=loaders.test,
        optim=cfg.optim,
        trainer=cfg.trainer,
        device=setup.device,
        dtype=setup.dtype,
        eval_dtype=setup.eval_dtype,
        run=run,
        title=title,
        world=setup.world,
        tracker=tracker,
        resume_from=rank_resume_dir(cfg, setup, run),
        seed=int(cfg.seed),
        task=get_task(loaders.data.task),
        num_classes=loaders.data.num_classes,
        **options,
    )


def train_and_save(
    cfg: DictConfig,
    run: RunDir,
    setup: Setup,
    loaders: Loaders,
    model: nn.Module,
    spec: ModelSpec,
    teacher: nn.Module | None,
    title: str,
) -> FitResult:
    """Train `model` with cfg.method (and the teacher, if any); save weights (and each peer's, for online
    methods, in peers/NAME); return the history."""
    with random_stream(cfg.seed, "method"):  # adapters, peers: drawn from the seed alone
        method = new_method(cfg, model, teacher, loaders, lambda: spec.build(initial=True))
    tracker = open_trackers(cfg, run, setup.world.is_main)
    job = training_job(
        cfg,
        run,
        setup,
        loaders,
        method,
        title,
        tracker,
        val_loader=loaders.val,
        teacher_cache=open_teacher_cache(cfg, setup, loaders, teacher),
    )
    with tracker:  # closed as FINISHED, or FAILED/KILLED when training raises
        result = fit(job)
        if setup.world.is_main:
            save_model(run.path, model, spec)
            for name, peer in method.peer_models().items():
                (run.path / PEERS / name).mkdir(parents=True, exist_ok=True)
                save_model(run.path / PEERS / name, peer, spec)
            tracker.log_model(run.path, result.best_score, result.best_epoch, result.metric)
    return result


def open_teacher_cache(
    cfg: DictConfig, setup: Setup, loaders: Loaders, teacher: nn.Module | None
) -> TeacherCache | None:
    """The teacher cache for this run's data stream (teacher_cache.enabled), keyed by all that decides
    the teacher's outputs: its weights and input conversion, the data, the stream, and how it computes."""
    settings = cfg.get("teacher_cache")
    if teacher is None or settings is None or not settings.enabled:
        return None
    description = {
        "format": 2,  # 2: the features a method reads beside the logits
        "teacher": teacher_identity(teacher),
        "teacher_arch": cfg.teacher.arch,
        "dataset": cfg.dataset.name,
        "data_fingerprint": loaders.data.fingerprint,
        "stream": loaders.train.stream_identity(),
        "device": setup.device.type,
        "precision": str(setup.dtype),
        "channels_last": use_channels_last(cfg.trainer.channels_last, setup.device, setup.dtype),
        "torch": torch.__version__,
    }
    return TeacherCache(Path(str(settings.dir)), description, int(float(settings.max_gb) * 2**30))


def rank_resume_dir(cfg: DictConfig, setup: Setup, run: RunDir) -> Path | None:
    """Under DDP, ranks other than 0 continue rank 0's checkpoint: the same place (a born-again
    generation's folder too) under the resumed run instead of their own scratch directory."""
    if setup.world.is_main or not cfg.get("resume"):
        return None
    return Path(str(cfg.resume)) / run.path.relative_to(output_dir())
