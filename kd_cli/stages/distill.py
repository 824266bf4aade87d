"""`kd distill`: train the student from the teacher with the configured method."""

from __future__ import annotations

import time

from omegaconf import DictConfig

from kd_cli.engine.metrics import predict, topk_accuracy
from kd_cli.engine.rundir import RunDir
from kd_cli.methods import method_requires_teacher
from kd_cli.stages.common import count_parameters, print_config, setup_run
from kd_cli.stages.teacher import resolve_teacher
from kd_cli.stages.common import model_spec
from kd_cli.stages.training import finish, load_data, print_results, train_and_save


def main(cfg: DictConfig, run: RunDir) -> float:
    started = time.time()
    setup = setup_run(cfg, run)
    if setup.world.is_main:
        print_config(cfg)
    loaders = load_data(cfg, setup, run)
    teacher, teacher_spec, teacher_path = None, None, None
    teacher_top1 = None
    if method_requires_teacher(cfg.method.name):
        teacher, teacher_spec, teacher_path = resolve_teacher(cfg, loaders.data, setup.device)
        logits, labels = predict(teacher, loaders.test, setup.device, setup.dtype)
        teacher_top1 = topk_accuracy(logits, labels)
    spec = model_spec(cfg.student, loaders.data, cfg.dataset)
    student = spec.build()
    result = train_and_save(cfg, run, setup, loaders, student, spec, teacher, title=f"student {spec.arch}")
    if setup.world.is_main:
        summary = finish(
            run, cfg, result, student, started, role="student", arch=spec.arch,
            teacher_arch=teacher_spec.arch if teacher_spec else None,
            teacher_run=str(teacher_path) if teacher_path else None,
            teacher_top1=teacher_top1, teacher_params=count_parameters(teacher) if teacher else None,
        )
        rows = []
        if teacher is not None:
            rows += [(f"teacher {teacher_spec.arch} test top-1", teacher_top1), ("teacher parameters", summary["teacher_params"])]
        rows += [(f"student {spec.arch} test top-1 (last)", summary["last_top1"]),
                 ("student test top-1 (best)", summary["best_top1"]), ("student parameters", summary["params"])]
        print_results(f"distill ({cfg.method.name}) on {cfg.dataset.name}", rows, run.path)
    return result.best_top1
