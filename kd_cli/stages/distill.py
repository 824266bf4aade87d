"""`kd distill`: train the student from the teacher with the configured method (for born-again
methods, a sequence of students, each teaching the next: stages/generations.py)."""

from __future__ import annotations

import time
from typing import Any

from omegaconf import DictConfig
from torch import nn

from kd_cli.engine.artifacts import ModelSpec
from kd_cli.engine.device import random_stream
from kd_cli.engine.loop import FitResult
from kd_cli.engine.rundir import RunDir
from kd_cli.methods import method_requires_teacher
from kd_cli.stages.data import Loaders, data_env, load_data
from kd_cli.stages.generations import train_generations
from kd_cli.stages.lifecycle import start_run
from kd_cli.stages.models import check_pretrained_form, model_spec
from kd_cli.stages.results import finish, objective, print_results, selection_rows
from kd_cli.stages.setup import print_config, setup_run
from kd_cli.stages.teacher import Teacher, for_checks, plan_teacher, ready_teacher, score_found_teacher, teacher_score
from kd_cli.stages.training import dry_build, train_and_save
from kd_cli.tasks import get_task


def main(cfg: DictConfig, run: RunDir) -> float:
    started = time.time()
    setup = setup_run(cfg)
    if setup.world.is_main:
        print_config(cfg)
    loaders = load_data(cfg, setup)
    spec, student = build_student(cfg, loaders)
    plan = plan_teacher(cfg, loaders.data, run, setup.device) if method_requires_teacher(cfg.method.name) else None
    dry_build(cfg, student, for_checks(plan), loaders)  # every check the method makes, before any work
    score_found_teacher(plan, loaders, setup)  # (detection: an unloaded or untrained teacher, refused now)
    start_run(cfg, run, setup, **data_env(cfg, setup, loaders))
    teacher = ready_teacher(plan, cfg, run, loaders, setup) if plan is not None else None
    last_teacher, generations_top1 = train_generations(
        cfg, run, setup, loaders, spec, teacher.model if teacher else None, started
    )
    result = train_and_save(cfg, run, setup, loaders, student, spec, last_teacher, title=f"student {spec.arch}")
    if teacher is not None and loaders.val is not None:  # training is over: the teacher's test score
        teacher.score = teacher_score(teacher.model, teacher.path, loaders.test, loaders, setup)
    if setup.world.is_main:
        report(cfg, run, result, student, spec, teacher, generations_top1, started)
    return objective(result)


def build_student(cfg: DictConfig, loaders: Loaders) -> tuple[ModelSpec, nn.Module]:
    """The student's description and network, initialised from the seed's own stream (the same draws
    whether the teacher was found or trained first)."""
    spec = model_spec(cfg.student, loaders.data, cfg.dataset)
    with random_stream(cfg.seed, "model"):
        student = spec.build(initial=True)
    check_pretrained_form(student, cfg.dataset, "student")
    return spec, student


def report(
    cfg: DictConfig,
    run: RunDir,
    result: FitResult,
    student: nn.Module,
    spec: ModelSpec,
    teacher: Teacher | None,
    generations_top1: list[float],
    started: float,
) -> None:
    """summary.json (complete, written last) and the final table."""
    per_generation = [*generations_top1, result.last_score] if generations_top1 else None
    task = get_task(result.task)
    summary = finish(
        run,
        cfg,
        result,
        student,
        started,
        role="student",
        arch=spec.arch,
        generations_top1=per_generation,
        teacher_arch=teacher.spec.arch if teacher else None,
        teacher_run=str(teacher.path) if teacher else None,
        **{f"teacher_{task.metric}": teacher.score if teacher else None},
        teacher_params=teacher.params if teacher else None,
    )
    rows: list[tuple[str, Any]] = []
    if teacher is not None:
        rows += [
            (f"teacher {teacher.spec.arch} test {task.metric_label}", teacher.score),
            ("teacher parameters", teacher.params),
        ]
    rows += [(f"generation {k} test top-1", top1) for k, top1 in enumerate(generations_top1, 1)]
    rows += [*selection_rows(summary, f"student {spec.arch}"), ("student parameters", summary["params"])]
    rows += [
        (f"{name} {spec.arch} test {task.metric_label} (last)", value)
        for name, value in result.peers_last_score.items()
    ]
    print_results(f"distill ({cfg.method.name}) on {cfg.dataset.name}", rows, run.path)
