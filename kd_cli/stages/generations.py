"""Born-again networks (`method.generations`): students trained one after another, each taught by the one
before, the first by the teacher. Generation K (of generations - 1) trains in RUN/generation-K, a run
directory of its own (reused as it is when complete, so a resumed run continues at the first unfinished
one); the last generation is the distill run itself."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from kd_cli.engine.artifacts import ModelSpec, load_model
from kd_cli.engine.device import random_stream
from kd_cli.engine.rundir import RunDir, is_complete, read_summary
from kd_cli.stages.data import Loaders
from kd_cli.stages.results import finish
from kd_cli.stages.setup import Setup
from kd_cli.stages.training import train_and_save


def train_generations(
    cfg: DictConfig,
    run: RunDir,
    setup: Setup,
    loaders: Loaders,
    spec: ModelSpec,
    teacher: nn.Module | None,
    started: float,
) -> tuple[nn.Module | None, list[float]]:
    """(the teacher of the last generation, each earlier generation's test top-1); with one generation,
    the teacher itself and no top-1s."""
    top1s = []
    for generation in range(1, int(cfg.method.get("generations", 1))):
        student = train_generation(cfg, run, setup, loaders, spec, teacher, generation, started)
        top1s.append(read_summary(run.path / f"generation-{generation}")["last_top1"])
        teacher = student.eval().requires_grad_(False)
    return teacher, top1s


def train_generation(
    cfg: DictConfig,
    run: RunDir,
    setup: Setup,
    loaders: Loaders,
    spec: ModelSpec,
    teacher: nn.Module | None,
    generation: int,
    started: float,
) -> nn.Module:
    """One generation in RUN/generation-K (reused as it is when already complete)."""
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
