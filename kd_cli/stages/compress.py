"""`kd compress`: make a trained model smaller and faster (structured/unstructured pruning, low rank,
int8), recover its accuracy with distillation from the uncompressed model through the same training
loop as `kd distill`, and measure every step: parameters, MACs, size on disk, sparsity, CPU latency
and the task's score (top-1 for a classifier, mIoU for a segmenter), before and after."""

from __future__ import annotations

import copy
import csv
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kd_cli.compress import FINETUNE, STEPS, build_step, check_steps, is_int8
from kd_cli.compress.context import StepContext
from kd_cli.compress.prune_unstructured import copyable, make_permanent
from kd_cli.compress.step import CompressionStep
from kd_cli.console import print_table
from kd_cli.engine.artifacts import (
    ModelSpec,
    load_model,
    load_spec,
    resolve_weights,
    save_model,
    weights_digest,
)
from kd_cli.engine.device import random_stream
from kd_cli.engine.loop import fit
from kd_cli.engine.metrics import score as score_split
from kd_cli.engine.rundir import COMPLETE, CONFIG, RunDir
from kd_cli.engine.trackers import Trackers, open_trackers
from kd_cli.errors import KdError
from kd_cli.methods import method_requires_teacher
from kd_cli.models import model_task
from kd_cli.models.torchvision_segmentation import without_training_heads
from kd_cli.stages.data import Loaders, data_env, eval_loader, load_data, saved_dataset
from kd_cli.stages.lifecycle import start_run
from kd_cli.stages.measure import Measurement, measure
from kd_cli.stages.models import check_model_fits
from kd_cli.stages.setup import Setup, print_config, setup_run
from kd_cli.stages.training import dry_build, new_method, training_job
from kd_cli.tasks import Task, get_task

log = logging.getLogger("kd")
TABLE = "compression.csv"
FLOAT_DIR = "float"  # beside an int8 result: the float model it was quantised from (for ONNX export)


def main(cfg: DictConfig, run: RunDir) -> float:
    started = time.time()
    steps = plan(cfg.compression)
    weights = resolve_weights(cfg.run)
    if model_task(load_spec(weights).arch) == "detection":
        check_detector_steps(cfg.compression)
    if is_int8(load_spec(weights).extra):
        raise KdError(f"{weights} is already int8; compress its float model instead")
    digest = weights_digest(weights)
    if run.previous.get("model_weights_sha256") not in (None, digest):
        raise KdError(
            f"{weights} holds other weights than when this run started (sha256 {digest}, was "
            f"{run.previous['model_weights_sha256']}); a resumed run keeps its model: restore it, or start "
            f"a new run"
        )
    run.keep(model_weights_sha256=digest)
    use_saved_dataset(cfg, weights)
    setup = setup_run(cfg)  # (a segmenter's recovery method: the task's, see checks.use_the_tasks_method)
    print_config(cfg)
    original, spec = load_model(weights, setup.device)
    original, kwargs = without_training_heads(original, spec.kwargs)  # (an aux head is not deployed)
    spec = replace(spec, kwargs=kwargs)
    check_steps(original, steps)  # layer names and kinds, each step on the names the ones before leave
    loaders = load_data(cfg, setup)
    check_model_fits(spec, loaders.data, weights, "model", same_size=True)
    if FINETUNE in cfg.compression.steps:  # the recovery method's own checks, before anything is written
        dry_build(cfg, copy.deepcopy(original), _teacher(cfg, original), loaders, online=False)
    start_run(cfg, run, setup, **data_env(cfg, setup, loaders), model=str(weights))
    task = get_task(model_task(spec.arch))
    ctx = StepContext(
        example=_example(spec, setup.device),
        calibration_data=_calibration_loader(cfg, loaders, spec, setup.device),
        loss=task.loss,
        transforms=list(spec.extra.get("transforms", [])),
    )
    score = _scorer(cfg, loaders, spec, setup, task)
    figures = dict(
        score_of=score, metric=task.metric, batch_sizes=list(cfg.latency_batch_sizes), batches=cfg.latency_batches
    )
    rows = [measure("original", original, spec, **figures)]
    model, float_model = copy.deepcopy(original), None
    with open_trackers(cfg, run, setup.world.is_main) as tracker:  # logger=: recovery epochs + the model
        for name, step in steps:
            if name == FINETUNE:
                model = finetune(cfg, run, setup, loaders, model, original, tracker)
            else:
                before = rows[-1]
                float_model = copy.deepcopy(copyable(model)) if name == "quantize_int8" else None
                assert step is not None  # only finetune has none (plan)
                model = step.apply(model, ctx)
                carried: dict[str, Any] = {}  # int8 has the float model's params and MACs (see measure)
                if name == "quantize_int8":
                    carried = dict(params=before.params, macs=before.macs)
                rows.append(measure(name, model, spec, **figures, **carried))
                continue
            rows.append(measure(f"+ {FINETUNE} ({cfg.method.name})", model, spec, **figures))
        make_permanent(model)
        saved = replace(spec, extra={**spec.extra, "transforms": ctx.transforms, "compressed_from": str(weights)})
        if float_model is not None:
            float_spec = replace(spec, extra={**spec.extra, "transforms": ctx.transforms[:-1]})
            save_model(run.path / FLOAT_DIR, make_permanent(float_model), float_spec)
            shutil.copyfile(run.path / CONFIG, run.path / FLOAT_DIR / CONFIG)  # its data set, for export's check
        save_model(run.path, model, saved)
        reloaded = check_reload(run.path, rows[-1], score, task)
        tracker.log_model(run.path, rows[-1].score, len(steps))
    summary = summarise(cfg, rows, reloaded, started, spec, task)
    write_table(run.path / TABLE, rows)
    run.write_summary(COMPLETE, **summary)
    print_measurements(cfg, rows, spec, run.path, task)
    return rows[-1].score


def plan(compression: DictConfig) -> list[tuple[str, CompressionStep | None]]:
    """The steps with their options checked, before any data is read or model loaded."""
    names = list(compression.steps)
    if not names:
        raise KdError("compression.steps is empty; pick a preset, e.g. compression=prune_structured")
    if names.count(FINETUNE) > 1:
        raise KdError("compression.steps: at most one finetune (the recovery training) per run")
    if "quantize_int8" in names and names.index("quantize_int8") != len(names) - 1:
        raise KdError("compression.steps: quantize_int8 must be the last step (int8 weights are not trained further)")
    steps: list[tuple[str, CompressionStep | None]] = []
    for name in names:
        if name == FINETUNE:
            steps.append((name, None))
            continue
        if name not in STEPS:
            raise KdError(
                f"compression.steps: unknown step '{name}' (choose from: {', '.join([*STEPS.names(), FINETUNE])})"
            )
        options = compression.get(name)
        if options is None:
            raise KdError(f"compression.steps names {name} but compression.{name} has no settings")
        steps.append((name, build_step(name, cast("dict[str, Any]", OmegaConf.to_container(options, resolve=True)))))
    return steps


def check_detector_steps(compression: DictConfig) -> None:
    """What kd cannot do to a detector, said before any work: int8 (torch.fx cannot trace the data-dependent
    post-processing after the heads) and Taylor importance (a detector's loss needs its training pass)."""
    if "quantize_int8" in compression.steps:
        raise KdError(
            "compression.steps: quantize_int8 does not serve detectors (torch.fx cannot trace their box "
            "post-processing); prune them (compression=prune_structured) or export them to ONNX for an int8 runtime"
        )
    prune = compression.get("prune_structured")
    if "prune_structured" in compression.steps and prune is not None and prune.get("importance") == "taylor":
        raise KdError(
            "compression.prune_structured.importance=taylor needs a classifier's or segmenter's loss; for a "
            "detector use importance=magnitude or bn_scale"
        )


def use_saved_dataset(cfg: DictConfig, weights: Path) -> None:
    """The data set the model was trained on, unless the command line gives one."""
    if cfg.dataset is not None:
        return
    saved = saved_dataset(weights)
    if saved is None:
        raise KdError(f"no {CONFIG} beside {weights} to tell its data set; pass dataset=NAME (and its options)")
    with open_dict(cfg):
        cfg.dataset = OmegaConf.create(saved)


def finetune(
    cfg: DictConfig,
    run: RunDir,
    setup: Setup,
    loaders: Loaders,
    model: nn.Module,
    uncompressed: nn.Module,
    tracker: Trackers,
) -> nn.Module:
    """Recovery training in the engine's one loop; the uncompressed model teaches (cfg.method)."""
    teacher = _teacher(cfg, uncompressed)
    model = model.to(setup.device).requires_grad_(True)
    with random_stream(cfg.seed, "method"):
        method = new_method(cfg, model, teacher, loaders, new_student=None)
    fit(training_job(cfg, run, setup, loaders, method, f"recovery ({cfg.method.name})", tracker))
    return model.eval()


def _teacher(cfg: DictConfig, uncompressed: nn.Module) -> nn.Module | None:
    if not method_requires_teacher(cfg.method.name):
        return None
    return copy.deepcopy(uncompressed).eval().requires_grad_(False)


def _example(spec: ModelSpec, device: torch.device) -> torch.Tensor:
    return torch.zeros(1, spec.in_channels, spec.input_size, spec.input_size, device=device)


def _calibration_loader(cfg: DictConfig, loaders: Loaders, spec: ModelSpec, device: torch.device):
    """Training images without augmentation, in a fixed order (calibration and Taylor scores)."""
    return eval_loader(cfg, loaders.data.train, spec, device, batch_size=cfg.trainer.batch_size)


def _scorer(cfg: DictConfig, loaders: Loaders, spec: ModelSpec, setup: Setup, task: Task):
    """The task's headline score on the test split: on the run's device, or the CPU for int8 models
    (streamed batch by batch: a segmentation split's logits never sit in memory)."""
    cpu_loader = None

    def score(model: nn.Module) -> float:
        nonlocal cpu_loader
        on_cpu = all(t.device.type == "cpu" for t in model.state_dict().values() if isinstance(t, torch.Tensor))
        if not on_cpu or setup.device.type == "cpu":
            passed = score_split(model, loaders.test, setup.device, setup.eval_dtype, task.new_score(spec.num_classes))
        else:
            if cpu_loader is None:
                cpu_loader = eval_loader(cfg, loaders.data.test, spec, torch.device("cpu"))
            passed = score_split(
                model, cpu_loader, torch.device("cpu"), torch.float32, task.new_score(spec.num_classes)
            )
        if not passed.all_finite:
            raise KdError(
                "the model gives non-finite outputs (NaN or inf) on the test images at this step; "
                "nothing is reported for it (lower optim.lr for the recovery, or change the step's settings)"
            )
        return passed.result()[task.metric]

    return score


def check_reload(path: Path, final: Measurement, score, task: Task) -> float:
    """Load the saved files back (as `kd evaluate` will) and insist on the same score."""
    model, _ = load_model(path, "cpu")
    reloaded = score(model)
    if abs(reloaded - final.score) > 1e-9:
        raise KdError(
            f"the saved model scores {reloaded:.2f}% {task.metric_label} after reloading but {final.score:.2f}% "
            f"before saving; this architecture does not survive this compression's save/load (please report it)"
        )
    return reloaded


def summarise(
    cfg: DictConfig, rows: list[Measurement], reloaded: float, started: float, spec: ModelSpec, task: Task
) -> dict:
    first, last, metric = rows[0], rows[-1], task.metric
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return {
        "stage": "compress",
        "task": task.name,
        "metric": metric,
        "compression": cfg.compression.get("name", "custom"),
        "steps": list(cfg.compression.steps),
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "arch": spec.arch,
        "model": str(cfg.run),
        "seed": cfg.seed,
        "original": first.row(),
        "compressed": last.row(),
        "rows": [r.row() for r in rows],
        "params": last.params,
        "params_ratio": ratio(last.params, first.params),
        "macs_ratio": ratio(last.macs, first.macs),
        "size_ratio": ratio(last.size_bytes, first.size_bytes),
        **{f"speedup_b{b}": ratio(first.latency_ms[b], last.latency_ms[b]) for b in first.latency_ms},
        f"{metric}_original": first.score,
        f"last_{metric}": last.score,
        f"best_{metric}": last.score,
        f"{metric}_drop": first.score - last.score,
        f"reload_{metric}": reloaded,
        "latency_threads": torch.get_num_threads(),
        "wall_time_s": time.time() - started,
    }


def write_table(path: Path, rows: list[Measurement]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].row()))
        writer.writeheader()
        writer.writerows(r.row() for r in rows)


def print_measurements(cfg: DictConfig, rows: list[Measurement], spec: ModelSpec, run_dir: Path, task: Task) -> None:
    from rich.console import Console

    sizes = list(rows[0].latency_ms)
    headers = [
        "step",
        "params",
        "MACs",
        "size KiB",
        "sparsity %",
        *[f"CPU ms b{b}" for b in sizes],
        f"{task.metric_label} %",
    ]
    cells = [
        [
            r.step,
            f"{r.params:,}",
            f"{r.macs:,}",
            f"{r.size_bytes / 1024:,.1f}",
            f"{r.sparsity:.1f}",
            *[f"{r.latency_ms[b]:.3f}" for b in sizes],
            f"{r.score:.2f}",
        ]
        for r in rows
    ]
    first, last = rows[0], rows[-1]
    cells.append(
        [
            "ratio",
            f"{last.params / first.params:.2f}x",
            f"{last.macs / max(first.macs, 1):.2f}x",
            f"{last.size_bytes / first.size_bytes:.2f}x",
            "",
            *[f"{first.latency_ms[b] / last.latency_ms[b]:.2f}x speed" for b in sizes],
            f"{last.score - first.score:+.2f}",
        ]
    )
    print_table(
        f"compress {spec.arch} on {cfg.dataset.name} ({cfg.compression.get('name', 'custom')})",
        [(h, "left" if h == "step" else "right") for h in headers],
        cells,
        bold_last=True,
        width=max(Console().width, 120),  # the table is wide; logs and pipes get 120 columns
        notes=[
            f"CPU latency: median of {cfg.latency_batches} batches, {torch.get_num_threads()} thread(s)",
            f"run directory: {run_dir}",
        ],
    )
