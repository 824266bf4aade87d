"""Finding the teacher for `kd distill`: a given run/file, or `auto`: the newest complete teacher
run trained on the same data (same data fingerprint) with the same architecture, trained first by
`kd train-teacher` when there is none.

The teacher is decided (`plan_teacher`) before the distill run starts, so a teacher that does not fit
the data is refused before anything is written or trained; it is then recorded in the run's summary
(`teacher_run`) before it is trained or used, so a resumed run keeps the teacher it started with
(and continues training it, when the run was stopped while its teacher trained).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_cli.data import DataSplits
from kd_cli.engine.artifacts import META, ModelSpec, load_model, weights_digest
from kd_cli.engine.files import read_json
from kd_cli.engine.process import run_child
from kd_cli.engine.rundir import ENV, SUMMARY, RunDir, holds_run, is_complete
from kd_cli.errors import KdError, warn
from kd_cli.models.input_form import Form, feed_own_form
from kd_cli.stages.data import Loaders
from kd_cli.stages.models import check_model_fits, model_spec, options_with_defaults
from kd_cli.stages.setup import Setup

log = logging.getLogger("kd")

# Overrides of a distill command that also shape its auto-trained teacher.
TEACHER_OVERRIDE_KEYS = (
    "dataset",
    "teacher",
    "trainer",
    "optim",
    "augmentation",
    "seed",
    "paths",
    "debug",
    "logger",
    "experiment",
)


@dataclass
class TeacherPlan:
    path: Path  # the teacher's run directory or weights file (to be trained there when `train`)
    spec: ModelSpec  # what it is: its model.json, or the architecture to train
    train: bool = False  # no such teacher yet: `kd train-teacher` into `path` once the run has started
    model: nn.Module | None = None  # already loaded (a found or given teacher)
    score: float | None = None  # its score on the validation (else test) split, once `score_found_teacher` ran


def plan_teacher(cfg: DictConfig, data: DataSplits, run: RunDir, device: torch.device) -> TeacherPlan:
    """Which teacher this run uses, checked against the data; nothing is trained or written yet."""
    pinned = run.previous.get("teacher_run")
    if pinned:  # a resumed run: the teacher it started with, whatever is newest now
        return _pinned(
            cfg,
            data,
            Path(pinned),
            bool(run.previous.get("teacher_trained_for_this_run")),
            device,
            run.previous.get("teacher_weights_sha256"),
        )
    source = cfg.teacher.checkpoint
    if not source:
        raise KdError("distill needs a teacher: set teacher.checkpoint=RUN_DIR, a model.safetensors file, or auto")
    if source == "auto":
        for found in teacher_runs(cfg, data):  # newest first; one that does not load is skipped, said so
            try:
                plan = _loaded(found, data, device, _normalisation(cfg))
            except KdError as error:
                warn(f"teacher.checkpoint=auto skips {found}: {error}")
                continue
            log.info(f"teacher: {cfg.teacher.arch} from {found} (newest complete teacher run on this data)")
            return plan
        return TeacherPlan(new_teacher_dir(cfg), model_spec(cfg.teacher, data, cfg.dataset), train=True)
    plan = _loaded(Path(source), data, device, _normalisation(cfg))
    check_command_line_agrees(cfg, plan.spec, source)
    return plan


def check_command_line_agrees(cfg: DictConfig, spec: ModelSpec, source: str) -> None:
    """A checkpoint says which network it holds (its model.json); a teacher architecture or option given on
    the command line beside it would otherwise be ignored in silence. One that disagrees is refused."""
    if not HydraConfig.initialized():
        return
    for override in HydraConfig.get().overrides.task:
        key = override.lstrip("+~").split("=")[0]
        if key in ("teacher", "teacher.arch") and str(cfg.teacher.arch) != spec.arch:
            given, held = f"{key}={cfg.teacher.arch}", f"a {spec.arch}"
        elif key.startswith("teacher.kwargs."):
            name = key.removeprefix("teacher.kwargs.")
            value = OmegaConf.select(cfg.teacher.kwargs, name)
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            if spec.kwargs.get(name) == value:
                continue
            given, held = f"{key}={value}", f"a {spec.arch} with {name}={spec.kwargs.get(name, 'unset')}"
        else:
            continue
        raise KdError(
            f"{given} disagrees with teacher.checkpoint={source}, which holds {held} (its model.json says what "
            f"it is): drop {key}=, or give a checkpoint of that teacher"
        )


def _pinned(
    cfg: DictConfig, data: DataSplits, path: Path, trained_here: bool, device: torch.device, digest: str | None
) -> TeacherPlan:
    if is_complete(path) or path.is_file():
        if digest and weights_digest(path) != digest:
            raise KdError(
                f"the teacher this run started with ({path}) holds other weights now (sha256 "
                f"{weights_digest(path)}, was {digest}); a resumed run keeps its teacher: restore "
                f"them, or start a new run"
            )
        return _loaded(path, data, device, _normalisation(cfg))
    if trained_here:  # the run was stopped while its teacher trained (or before it began): continue that
        return TeacherPlan(path, model_spec(cfg.teacher, data, cfg.dataset), train=True)
    raise KdError(
        f"the teacher this run started with ({path}) is gone or unfinished; a resumed run keeps its "
        f"teacher: restore it, or start a new run"
    )


def _loaded(path: Path, data: DataSplits, device: torch.device, normalisation: tuple) -> TeacherPlan:
    model, spec = load_model(path, device)
    check_model_fits(spec, data, path, "teacher", normalisation, converted=True)
    in_own_form(model, spec, data, normalisation)
    return TeacherPlan(path, spec, model=model)


def in_own_form(model: nn.Module, spec: ModelSpec, data: DataSplits, normalisation: tuple) -> None:
    """Let the teacher see each batch as it was trained to (its size, normalisation, channels)."""
    data_form = Form(data.in_channels, data.input_size, tuple(normalisation[0]), tuple(normalisation[1]))
    own = Form(spec.in_channels, spec.input_size, tuple(spec.mean), tuple(spec.std))
    if feed_own_form(model, data_form, own) is not None:
        log.info(
            f"teacher: images converted from the data's form ({data_form.describe()}) to its own "
            f"({own.describe()}) on the device"
        )


def _normalisation(cfg: DictConfig) -> tuple:
    return list(cfg.dataset.mean), list(cfg.dataset.std)


def obtain_teacher(
    plan: TeacherPlan, cfg: DictConfig, run: RunDir, data: DataSplits, device: torch.device
) -> tuple[nn.Module, ModelSpec, Path]:
    """The teacher model, trained first when the plan says so; recorded in the run before either."""
    run.keep(teacher_run=str(plan.path), **({"teacher_trained_for_this_run": True} if plan.train else {}))
    if not plan.train:
        run.keep(teacher_weights_sha256=weights_digest(plan.path))
        assert plan.model is not None  # a plan that trains nothing holds its loaded teacher (_loaded)
        return plan.model, plan.spec, plan.path
    train_teacher(cfg, plan.path)
    model, spec = load_model(plan.path, device)
    check_model_fits(spec, data, plan.path, "teacher", _normalisation(cfg), converted=True)
    in_own_form(model, spec, data, _normalisation(cfg))
    run.keep(teacher_weights_sha256=weights_digest(plan.path))
    return model, spec, plan.path


@dataclass
class Teacher:
    """The teacher a distill run uses, and what its table reports of it."""

    model: nn.Module
    spec: ModelSpec
    path: Path
    score: float  # the task's metric (top-1, mIoU) on the validation split while training (test: after it)
    params: int


def ready_teacher(plan: TeacherPlan, cfg: DictConfig, run: RunDir, loaders: Loaders, setup: Setup) -> Teacher:
    """The planned teacher obtained (trained first if need be), its outputs checked finite and scored on
    the validation split when there is one (the test split waits for the end of training)."""
    from kd_cli.stages.models import count_parameters

    model, spec, path = obtain_teacher(plan, cfg, run, loaders.data, setup.device)
    score = plan.score if plan.score is not None and plan.model is model else None
    if score is None:
        score = teacher_score(model, path, loaders.val or loaders.test, loaders, setup)
    return Teacher(model, spec, path, score, count_parameters(model))


def score_found_teacher(plan: TeacherPlan | None, loaders: Loaders, setup: Setup) -> None:
    """A teacher already at hand, scored before the run directory is written where its task sets a floor
    (detection): one that fails it is refused with nothing written. A teacher still to be trained is scored
    once trained (`ready_teacher`)."""
    from kd_cli.tasks import get_task

    if plan is None or plan.model is None or get_task(loaders.data.task).teacher_floor is None:
        return
    plan.score = teacher_score(plan.model, plan.path, loaders.val or loaders.test, loaders, setup)


def teacher_score(model: nn.Module, path: Path, loader, loaders: Loaders, setup: Setup) -> float:
    """The teacher's score in the task's metric on `loader`; its outputs checked finite on the way."""
    from kd_cli.engine.metrics import score
    from kd_cli.tasks import get_task

    task = get_task(loaders.data.task)
    scores = score(model, loader, setup.device, setup.eval_dtype, task.new_score(loaders.data.num_classes))
    if not scores.all_finite:
        raise KdError(
            f"teacher {path} gives non-finite outputs (NaN or inf) on the test images; its weights are "
            f"broken: retrain it or give another teacher"
        )
    value = scores.result()[task.metric]
    if task.teacher_floor is not None and not value >= task.teacher_floor:
        raise KdError(
            f"teacher {path} scores {value:.2f} {task.metric_label} on the "
            f"{'validation' if loaders.val is not None else 'test'} images, no better than an untrained model "
            f"(below {task.teacher_floor:g}): it was not trained, or trained on other images or classes; "
            "give a trained teacher (or train one: teacher.checkpoint=auto)"
        )
    return value


def for_checks(plan: TeacherPlan | None) -> nn.Module | None:
    """The teacher for the dry build's checks: the one found, or a network of its architecture when it
    is still to be trained."""
    if plan is None:
        return None
    return plan.model if plan.model is not None else plan.spec.build()


def teacher_runs(cfg: DictConfig, data: DataSplits) -> list[Path]:
    """The complete teacher runs under paths.outputs for this architecture and data, newest first; runs
    whose files are broken or unreadable are skipped with a warning (never the reason to train a new
    one silently)."""
    wanted = (cfg.teacher.arch, options_with_defaults(cfg.teacher), data.fingerprint)
    candidates = []
    for meta in Path(cfg.paths.outputs).glob("**/" + META):
        run = meta.parent
        try:
            if read_json(run / SUMMARY).get("role") != "teacher" or not is_complete(run):
                continue
            spec, env = read_json(meta), read_json(run / ENV)
            found = (spec.get("arch"), spec.get("kwargs"), env.get("data_fingerprint"))
            modified = meta.stat().st_mtime
        except (OSError, ValueError, AttributeError) as error:
            if not isinstance(error, FileNotFoundError):
                warn(f"teacher.checkpoint=auto skips {run}: {_reason(error)}")
            continue
        if found == wanted:
            candidates.append((modified, run))
    return [run for _, run in sorted(candidates, reverse=True)]


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError):
        return f"cannot read {error.filename} ({error.strerror})"
    return f"a file is not valid JSON ({str(error).splitlines()[0][:120]})"


def new_teacher_dir(cfg: DictConfig) -> Path:
    return (
        Path(cfg.paths.outputs) / "train-teacher" / time.strftime("%Y-%m-%d") / time.strftime(f"%H-%M-%S-{os.getpid()}")
    )


def train_teacher(cfg: DictConfig, run_dir: Path) -> None:
    """Run `kd train-teacher` with this command's data/teacher/trainer overrides, in a subprocess, so
    the teacher gets a run directory of its own; a stopped one is continued (resume=) there."""
    if holds_run(run_dir):
        args = ["train-teacher", f"resume={run_dir}", *_progress_override()]
        log.info(f"teacher: continuing the stopped training of this run's teacher: kd {' '.join(args)}")
    else:
        args = ["train-teacher", *_teacher_overrides(), f"hydra.run.dir={run_dir}"]
        log.info(
            f"teacher: no complete {cfg.teacher.arch} teacher for this data under {cfg.paths.outputs}; "
            f"training one first: kd {' '.join(args)}"
        )
    done = run_child([sys.executable, "-m", "kd_cli", *args])
    if done.returncode != 0 or not is_complete(run_dir):
        lines = done.stderr.strip().splitlines() if done.stderr else []
        reason = lines[-1].removeprefix("kd: error: ") if lines else f"exit status {done.returncode}"
        raise KdError(f"training the teacher failed: {reason} (run directory {run_dir})")


def _progress_override() -> list[str]:
    return [o for o in HydraConfig.get().overrides.task if o.lstrip("+").startswith("trainer.progress=")]


def _teacher_overrides() -> list[str]:
    hydra = HydraConfig.get()
    overrides = [
        o
        for o in hydra.overrides.task
        if o.lstrip("+~").split("=")[0].split(".")[0] in TEACHER_OVERRIDE_KEYS
        and not o.lstrip("+~").startswith("teacher.checkpoint")
    ]
    user_dirs = [s.path for s in hydra.runtime.config_sources if s.provider == "command-line" and s.schema == "file"]
    # method=none last: a preset (experiment=...) may pick a distillation method for the student.
    config_dirs = [arg for d in user_dirs for arg in ("-cd", d)]
    return [*config_dirs, *overrides, "method=none"]
