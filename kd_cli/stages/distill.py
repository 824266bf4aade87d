"""`kd distill`: train the student from the teacher with the configured method (for born-again
methods, a sequence of students, each teaching the next)."""

from __future__ import annotations

import time

from omegaconf import DictConfig

from kd_cli.engine.artifacts import load_model
from kd_cli.engine.device import random_stream
from kd_cli.engine.metrics import predict, topk_accuracy
from kd_cli.engine.rundir import RunDir, is_complete, read_summary
from kd_cli.methods import method_requires_teacher
from kd_cli.stages.common import (
    check_pretrained_form,
    count_parameters,
    model_spec,
    print_config,
    setup_run,
    start_run,
)
from kd_cli.stages.teacher import (
    TeacherPlan,
    check_teacher_outputs,
    obtain_teacher,
    plan_teacher,
)
from kd_cli.stages.training import (
    data_env,
    dry_build,
    finish,
    load_data,
    objective,
    print_results,
    selection_rows,
    train_and_save,
)


def main(cfg: DictConfig, run: RunDir) -> float:
    started = time.time()
    setup = setup_run(cfg)
    if setup.world.is_main:
        print_config(cfg)
    loaders = load_data(cfg, setup)
    spec = model_spec(cfg.student, loaders.data, cfg.dataset)
    plan = plan_teacher(cfg, loaders.data, run, setup.device) if method_requires_teacher(cfg.method.name) else None
    with random_stream(cfg.seed, "model"):  # the same draws whether the teacher was found or trained first
        student = spec.build(initial=True)
    check_pretrained_form(student, cfg.dataset, "student")
    dry_build(cfg, student, _teacher_for_checks(plan), loaders)
    start_run(cfg, run, setup, **data_env(cfg, setup, loaders))
    teacher, teacher_spec, teacher_path = None, None, None
    teacher_top1 = None
    if plan is not None:
        teacher, teacher_spec, teacher_path = obtain_teacher(plan, cfg, run, loaders.data, setup.device)
        # checked on the validation split when there is one: the test split is read after training only
        logits, labels = predict(teacher, loaders.val or loaders.test, setup.device, setup.eval_dtype)
        check_teacher_outputs(logits, teacher_path)
        teacher_top1 = topk_accuracy(logits, labels)
    teacher_params = count_parameters(teacher) if teacher is not None else None
    first_teacher = teacher  # born-again replaces `teacher` by each generation's student
    generations = int(cfg.method.get("generations", 1))
    per_generation = []
    for generation in range(1, generations):  # born-again: each student teaches the next
        trained = train_generation(cfg, run, setup, loaders, spec, teacher, generation, started)
        per_generation.append(read_summary(run.path / f"generation-{generation}")["last_top1"])
        teacher = trained.eval().requires_grad_(False)
    result = train_and_save(cfg, run, setup, loaders, student, spec, teacher, title=f"student {spec.arch}")
    if generations > 1:
        per_generation.append(result.last_top1)
    if first_teacher is not None and loaders.val is not None:  # training is over: the teacher's test score
        teacher_top1 = topk_accuracy(*predict(first_teacher, loaders.test, setup.device, setup.eval_dtype))
    if setup.world.is_main:
        summary = finish(
            run,
            cfg,
            result,
            student,
            started,
            role="student",
            arch=spec.arch,
            generations_top1=per_generation or None,
            teacher_arch=teacher_spec.arch if teacher_spec else None,
            teacher_run=str(teacher_path) if teacher_path else None,
            teacher_top1=teacher_top1,
            teacher_params=teacher_params,
        )
        rows = []
        if teacher_spec is not None:
            rows += [
                (f"teacher {teacher_spec.arch} test top-1", teacher_top1),
                ("teacher parameters", summary["teacher_params"]),
            ]
        rows += [(f"generation {k} test top-1", top1) for k, top1 in enumerate(per_generation[:-1], 1)]
        rows += [*selection_rows(summary, f"student {spec.arch}"), ("student parameters", summary["params"])]
        rows += [(f"{name} {spec.arch} test top-1 (last)", top1) for name, top1 in result.peers_last_top1.items()]
        print_results(f"distill ({cfg.method.name}) on {cfg.dataset.name}", rows, run.path)
    return objective(result)


def _teacher_for_checks(plan: TeacherPlan | None):
    """The teacher, or a network of its architecture when it is still to be trained."""
    if plan is None:
        return None
    return plan.model if plan.model is not None else plan.spec.build()


def train_generation(cfg, run: RunDir, setup, loaders, spec, teacher, generation: int, started: float):
    """One born-again generation in run/generation-K (reused as it is when already complete)."""
    gen_run = RunDir(run.path / f"generation-{generation}")
    if is_complete(gen_run.path):
        return load_model(gen_run.path, setup.device)[0]
    with random_stream(cfg.seed, f"model/generation-{generation}"):
        student = spec.build(initial=True)
    result = train_and_save(
        cfg, gen_run, setup, loaders, student, spec, teacher, title=f"student {spec.arch} generation {generation}"
    )
    if setup.world.is_main:
        finish(gen_run, cfg, result, student, started, role="student", arch=spec.arch, generation=generation)
    return student
