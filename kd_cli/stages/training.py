"""Training shared by train-teacher and distill: data, loaders, the loop, saving, the summary."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_cli.console import print_table
from kd_cli.data import AugmentSpec, DataSplits, load_dataset, make_loader
from kd_cli.engine.artifacts import ModelSpec, load_model, save_model
from kd_cli.engine.device import random_stream, use_channels_last
from kd_cli.engine.loop import FitResult, Training, fit
from kd_cli.engine.rundir import COMPLETE, RunDir
from kd_cli.engine.teacher_cache import TeacherCache, teacher_identity
from kd_cli.engine.trackers import Trackers, check_trackers, open_trackers
from kd_cli.errors import KdError
from kd_cli.methods import build_method
from kd_cli.methods.base import Distiller
from kd_cli.stages.common import (
    PEERS,
    Setup,
    check_channels,
    count_parameters,
    dataset_options,
    output_dir,
)

log = logging.getLogger("kd")


@dataclass
class Loaders:
    data: DataSplits
    train: Any
    test: Any
    val: Any = None  # when the data set has a validation split: it chooses the best epoch


def load_data(cfg: DictConfig, setup: Setup) -> Loaders:
    """The data set and its loaders (reads only: the run directory is not written yet)."""
    check_trackers(cfg.get("logger"))  # a missing tracker extra fails here, before data, teacher or training
    data = load_dataset(dataset_options(cfg))
    check_channels(list(cfg.dataset.mean), list(cfg.dataset.std), data.in_channels)
    options = cast("dict[str, Any]", OmegaConf.to_container(cfg.augmentation, resolve=True))
    augmentation = {k: v for k, v in options.items() if k != "name"}
    common = dict(
        mean=list(cfg.dataset.mean),
        std=list(cfg.dataset.std),
        device=setup.device,
        seed=stream_seed(cfg),
        rank=setup.world.rank,
        world_size=setup.world.size,
        num_workers=cfg.trainer.num_workers,
    )
    train = make_loader(
        data.train,
        batch_size=cfg.trainer.batch_size,
        train=True,
        spec=AugmentSpec(**augmentation),
        drop_last=True,
        **common,
    )
    test = make_loader(
        data.test,
        batch_size=cfg.trainer.eval_batch_size,
        train=False,
        spec=None,
        **{**common, "rank": 0, "world_size": 1},
    )
    val = (
        None
        if data.val is None
        else make_loader(
            data.val,
            batch_size=cfg.trainer.eval_batch_size,
            train=False,
            spec=None,
            **{**common, "rank": 0, "world_size": 1},
        )
    )
    if len(train) == 0:  # (checked here, before the run starts, rather than when the loop begins)
        raise KdError(
            f"the training split has {train.num_samples} sample(s) per process, fewer than one batch "
            f"(trainer.batch_size={cfg.trainer.batch_size}); lower trainer.batch_size"
        )
    held_out = f" / {len(data.val)} val" if data.val is not None else ""
    log.info(
        f"data: {cfg.dataset.name}  {len(data.train)} train{held_out} / {len(data.test)} test  "
        f"{data.num_classes} classes  {data.in_channels}x{data.input_size}x{data.input_size}"
    )
    return Loaders(data, train, test, val)


def stream_seed(cfg: DictConfig) -> int:
    """The seed of the training batches (their order and augmentation): `dataset.aug_seed`, else `seed`.
    Runs that differ in `seed` alone then differ in the student's initialisation only, and share the
    teacher's outputs through the teacher cache."""
    aug_seed = cfg.dataset.get("aug_seed")
    return int(cfg.seed if aug_seed is None else aug_seed)


def data_env(cfg: DictConfig, setup: Setup, loaders: Loaders) -> dict[str, Any]:
    """What env.json says about the device and the data of a training run."""
    data = loaders.data
    return dict(
        device=str(setup.device),
        seed=cfg.seed,
        world_size=setup.world.size,
        data_fingerprint=data.fingerprint,
        train_samples=len(data.train),
        test_samples=len(data.test),
        val_samples=len(data.val) if data.val is not None else 0,
    )


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
            tracker.log_model(run.path, result.best_top1, result.best_epoch)
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


def finish(run: RunDir, cfg: DictConfig, result: FitResult, model: nn.Module, started: float, **extra: Any) -> dict:
    """Write summary.json with status complete (last, so its presence means the run is whole)."""
    last = result.last
    summary = {
        "stage": cfg.stage,
        "dataset": cfg.dataset.name,
        "method": cfg.method.name,
        "seed": cfg.seed,
        "epochs": last.get("epoch", 0),
        "best_top1": result.best_top1,
        "best_epoch": result.best_epoch,
        "selected_on": result.selected_on,
        "best_val_top1": result.best_val_top1,
        "last_top1": result.last_top1,
        "last_train_loss": last.get("train_loss"),
        "params": count_parameters(model),
        "images_per_s": last.get("images_per_s"),
        "resumed_from_epoch": result.resumed_from,
        "wall_time_s": time.time() - started,
        "teacher_cache": result.teacher_cache,
        # online distillation: each peer's test top-1 (last weights) and where it is saved
        "peers": {name: {"last_top1": top1, "path": f"{PEERS}/{name}"} for name, top1 in result.peers_last_top1.items()}
        or None,
        **extra,
    }
    run.write_summary(COMPLETE, **summary)
    return summary


def selection_rows(summary: dict, who: str = "") -> list[tuple[str, Any]]:
    """The final table's accuracy rows, each saying which split chose the epoch it reports."""
    who = f"{who} " if who else ""
    if summary.get("selected_on") == "val":
        return [
            (f"{who}test top-1 (best epoch on validation: {summary['best_epoch']})", summary["best_top1"]),
            (f"{who}validation top-1 (best)", summary["best_val_top1"]),
            (f"{who}test top-1 (last)", summary["last_top1"]),
        ]
    return [
        (f"{who}test top-1 (last)", summary["last_top1"]),
        (f"{who}test top-1 (best on test: literature comparison only)", summary["best_top1"]),
    ]


def objective(result: FitResult) -> float:
    """What a sweeper optimises: validation top-1 when there is a validation split (never the test set's
    when it can be avoided), else the test-set best."""
    if result.selected_on == "val":
        assert result.best_val_top1 is not None  # set whenever a validation split chose the epoch
        return result.best_val_top1
    return result.best_top1


def print_results(title: str, rows: list[tuple[str, Any]], run_dir: Path) -> None:
    """The final table; the run directory below it."""
    cells = [
        [name, f"{value:.2f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)]
        for name, value in rows
    ]
    print_table(title, [("", "left"), ("value", "right")], cells, notes=[f"run directory: {run_dir}"])
