"""`kd train-teacher`: train the teacher architecture alone on the data set."""

from __future__ import annotations

import time

from omegaconf import DictConfig

from kd_cli.engine.device import random_stream
from kd_cli.engine.rundir import RunDir
from kd_cli.errors import KdError
from kd_cli.methods import method_requires_teacher
from kd_cli.stages.data import data_env, load_data
from kd_cli.stages.lifecycle import start_run
from kd_cli.stages.models import check_pretrained_form, model_spec
from kd_cli.stages.results import finish, objective, print_results, selection_rows
from kd_cli.stages.setup import print_config, setup_run
from kd_cli.stages.training import train_and_save


def main(cfg: DictConfig, run: RunDir) -> float:
    if method_requires_teacher(cfg.method.name):
        raise KdError(
            f"train-teacher trains without a teacher, so method={cfg.method.name} cannot be used; use method=none"
        )
    started = time.time()
    setup = setup_run(cfg)
    if setup.world.is_main:
        print_config(cfg)
    loaders = load_data(cfg, setup)
    spec = model_spec(cfg.teacher, loaders.data, cfg.dataset)
    with random_stream(cfg.seed, "model"):  # from pretrained weights when its options ask
        model = spec.build(initial=True)
    check_pretrained_form(model, cfg.dataset, "teacher")
    start_run(cfg, run, setup, **data_env(cfg, setup, loaders))
    result = train_and_save(cfg, run, setup, loaders, model, spec, teacher=None, title=f"teacher {spec.arch}")
    if setup.world.is_main:
        summary = finish(run, cfg, result, model, started, role="teacher", arch=spec.arch)
        print_results(
            f"teacher {spec.arch} on {cfg.dataset.name}",
            [*selection_rows(summary), ("parameters", summary["params"])],
            run.path,
        )
    return objective(result)
