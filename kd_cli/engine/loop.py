"""The one training loop. Teacher training, distillation and compression recovery all run here:
what differs between them is the method (a teacher-less `none`, `kd`, ...), not the loop.

Model selection. With a validation loader, every evaluation epoch scores the validation split, the
best epoch is chosen on it and that epoch's student weights are kept (in the checkpoint too); the
test split is read once, after the last epoch, for the chosen weights and for the last ones, and the
student is left holding the chosen weights (so they are what the stage saves). Without one, the
test split is scored every evaluation epoch and "best" is the test-set best: the number papers
report, for comparison with them only, since choosing on the test set overstates accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from kd_cli.engine.device import autocast, derived_seed, seed_everything, use_channels_last
from kd_cli.engine.distributed import World, all_reduce_sum
from kd_cli.engine.metrics import score
from kd_cli.engine.optimizers import build_optimizer, param_groups
from kd_cli.engine.progress import make_reporter
from kd_cli.engine.resume_state import (
    LAST,
    load_resume_state,
    rng_state,
    save_resume_state,
    set_rng_state,
)
from kd_cli.engine.rundir import RunDir
from kd_cli.engine.schedule import Schedule, set_lr
from kd_cli.engine.teacher_cache import TeacherCache
from kd_cli.engine.trackers import Trackers
from kd_cli.engine.values import check_optim, compile_mode
from kd_cli.errors import KdError
from kd_cli.methods.base import Distiller
from kd_cli.models.features import backbone_parameters
from kd_cli.tasks import Classification, Task

log = logging.getLogger("kd")


@dataclass
class Training:
    """Everything one run of the loop needs."""

    method: Distiller
    train_loader: Any
    test_loader: Any
    optim: DictConfig
    trainer: DictConfig
    device: torch.device
    dtype: torch.dtype
    run: RunDir
    title: str
    world: World = field(default_factory=World)
    tracker: Trackers = field(default_factory=Trackers)  # TensorBoard/MLflow/W&B (logger=); none by default
    # Where this process reads the checkpoint it continues, if not its own run directory: under DDP the
    # other ranks write a scratch directory and continue rank 0's checkpoint.
    resume_from: Path | None = None
    val_loader: Any = None  # chooses the best epoch when given (see the module docstring)
    eval_dtype: torch.dtype | None = None  # evaluation's autocast dtype when not `dtype` (device.evaluation_precision)
    # The teacher's outputs stored by earlier runs of the same data stream (engine/teacher_cache.py); used
    # when the method reads the teacher's logits only.
    teacher_cache: TeacherCache | None = None
    # The loop's own draws (dropout, a method's sampling) start from (seed, "train"), whatever the stage
    # built or loaded before; a resumed run continues the checkpointed generator states instead.
    seed: int = 0
    # What the data set's task is (its loss is the method's; its score chooses the best epoch) and how
    # many classes the score counts.
    task: Task = field(default_factory=Classification)
    num_classes: int = 0


@dataclass
class FitResult:
    """The run's scores in the task's headline metric (`metric`: top1, miou)."""

    history: list[dict[str, Any]]
    best_score: float  # test score of the chosen epoch (the test-set best when chosen on test)
    best_epoch: int
    resumed_from: int
    last_score: float | None = None  # test score after the last epoch
    selected_on: str = "test"  # "val" or "test": the split that chose best_epoch
    best_val_score: float | None = None
    teacher_cache: dict[str, Any] | None = None  # what the teacher cache served (TeacherCache.summary)
    peers_last_score: dict[str, float | None] = field(default_factory=dict)  # test score of each peer's last weights
    metric: str = "top1"
    task: str = "classification"

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def fit(job: Training) -> FitResult:
    epochs = job.trainer.epochs
    check_optim(job.optim, epochs)
    method = job.method.to(job.device)
    if method.needs_index:
        _enable_index(job.train_loader)
    if use_channels_last(job.trainer.channels_last, job.device, job.dtype):
        method.to(memory_format=torch.channels_last)
        if method.teacher is not None:  # (not a submodule) the teacher runs in the student's memory format
            method.teacher.to(memory_format=torch.channels_last)
    params = [p for p in method.parameters() if p.requires_grad]
    backbone = backbone_parameters(method.student)
    optimizer = build_optimizer(param_groups(params, backbone, job.optim.backbone_lr_scale), job.optim)
    seed_everything(derived_seed(job.seed, "train"))
    state = _resume_state(job, method, optimizer)
    job.tracker.resume(state["history"])  # a resumed run: the checkpointed epochs the trackers missed
    if mode := compile_mode(job.trainer.compile):
        method.student.compile(mode=mode)
    forward = _wrap_ddp(method, job)
    steps = _steps_per_epoch(job)
    cache = _attach_teacher_cache(job, method, steps)
    scaler = torch.amp.GradScaler(job.device.type, enabled=job.dtype == torch.float16)
    with make_reporter(job.trainer.progress if job.world.is_main else "none", job.title, epochs, steps) as bar:
        for epoch in range(state["epoch"], epochs):
            with cache.epoch(epoch, job.device) if cache else contextlib.nullcontext():
                row = _train_epoch(job, method, forward, optimizer, scaler, epoch, steps, bar)
            if (epoch + 1) % job.trainer.eval_every == 0 or epoch + 1 == epochs:
                row.update(_evaluate(job, method, epoch))
            state["history"].append(row)
            _track_best(job, state, row, method)
            if job.world.is_main:
                _save_epoch(job, state, _checkpoint(method, optimizer, epoch + 1, state))
                job.tracker.log_epoch(row)
            bar.end_epoch(row)
    if job.val_loader is not None:
        result = _test_chosen(job, method, state)
    else:
        best = state["best"]
        last_row = state["history"][-1] if state["history"] else {}
        key = f"test_{job.task.metric}"
        result = FitResult(
            state["history"],
            best["score"],
            best["epoch"],
            state["resumed_from"],
            last_score=last_row.get(key),
            peers_last_score={name: last_row.get(f"{name}_{key}") for name in method.peer_models()},
            metric=job.task.metric,
            task=job.task.name,
        )
    result.teacher_cache = cache.summary() if cache else None
    return result


def _test_chosen(job: Training, method: Distiller, state: dict) -> FitResult:
    """The test split's first reading: the last weights, then the chosen epoch's, which stay loaded."""
    epochs_done = len(state["history"])
    key = f"test_{job.task.metric}"
    last = _score(job, method.student, job.test_loader, "test", epochs_done)[key]
    best = state["best"]
    chosen = last
    if best["epoch"] != epochs_done:
        method.student.load_state_dict(state["best_state"])
        chosen = _score(job, method.student, job.test_loader, "test", best["epoch"])[key]
    log.info(
        f"best epoch {best['epoch']} on validation ({best['score']:.2f}): test {job.task.metric_label} "
        f"{chosen:.2f} (last epoch {last:.2f})"
    )
    peers: dict[str, float | None] = {
        name: _score(job, peer, job.test_loader, "test", epochs_done)[key]
        for name, peer in method.peer_models().items()
    }
    return FitResult(
        state["history"],
        chosen,
        best["epoch"],
        state["resumed_from"],
        last_score=last,
        selected_on="val",
        best_val_score=best["score"],
        peers_last_score=peers,
        metric=job.task.metric,
        task=job.task.name,
    )


def _save_epoch(job: Training, state: dict, checkpoint: dict) -> None:
    """metrics.csv and the resume checkpoint; a failed write (a full disk) says where and what to do."""
    try:
        job.run.write_metrics(state["history"])
        save_resume_state(job.run.path, checkpoint)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        reason = getattr(error, "strerror", None) or str(error).splitlines()[-1].strip()[:160]
        raise KdError(
            f"cannot write the checkpoint in {job.run.path} ({reason}); free some space "
            f"and continue with resume={job.run.path} (the previous epoch's checkpoint is intact)"
        ) from None


def _attach_teacher_cache(job: Training, method: Distiller, steps: int) -> TeacherCache | None:
    features = method.teacher_cache_outputs() if method.teacher is not None else None
    if job.teacher_cache is None or features is None:
        return None
    job.teacher_cache.start(steps, features)
    method.teacher_outputs = job.teacher_cache
    return job.teacher_cache


def _enable_index(loader) -> None:
    if not hasattr(loader, "with_index"):
        raise KdError(
            "this method keeps a memory per training sample, which needs an in-memory data set "
            "(digits, MNIST, CIFAR, SVHN, synthetic), not an image folder"
        )
    loader.with_index = True


def _steps_per_epoch(job: Training) -> int:
    steps = len(job.train_loader)
    if job.trainer.max_steps_per_epoch:
        steps = min(steps, job.trainer.max_steps_per_epoch)
    if steps == 0:
        raise KdError("the training split has fewer samples than one batch; lower trainer.batch_size")
    return steps


def _wrap_ddp(method: Distiller, job: Training):
    if not job.world.distributed:
        return method
    ids = [job.device.index] if job.device.type == "cuda" else None
    # A phased method's first epochs leave some parameters without a gradient (DDP must look for them).
    return DistributedDataParallel(method, device_ids=ids, find_unused_parameters=method.phased)


def _train_epoch(job, method, forward, optimizer, scaler, epoch, steps, bar) -> dict[str, Any]:
    method.train()
    method.start_epoch(epoch, job.trainer.epochs)
    job.train_loader.set_epoch(epoch)
    bar.start_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    hits = torch.zeros((), device=job.device)  # what the task counts as right (images, pixels), and of how many
    counted = torch.zeros((), device=job.device)
    seen = 0
    channels_last = use_channels_last(job.trainer.channels_last, job.device, job.dtype)
    schedule = Schedule.from_config(job.optim, job.trainer.epochs)
    lr = None
    start = time.perf_counter()
    for step, (images, labels, *index) in enumerate(job.train_loader):
        if step >= steps:
            break
        if (step_lr := schedule.at(epoch + step / steps)) != lr:  # constant and step schedules: set once
            lr = step_lr
            set_lr(optimizer, lr)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(job.device, job.dtype):
            logits, terms = forward(images, labels, *index)
            terms.update(method.auxiliary_terms(labels))
        if not terms:
            raise KdError("the method returned no loss terms (every weight is 0?); give at least one a weight > 0")
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if job.trainer.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(method.parameters(), job.trainer.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        _accumulate(sums, terms, loss, len(labels))
        right, units = job.task.hits(logits, labels)
        hits += right
        counted += units
        seen += len(labels)
        bar.step(loss.detach)
    seconds = time.perf_counter() - start
    return _epoch_row(job, epoch, sums, (hits, counted), seen, seconds, lr)


def _accumulate(sums: dict, terms: dict, loss: torch.Tensor, batch: int) -> None:
    """Sum each term on the device: no host sync per batch (the loop stays as fast as a bare one)."""
    for name, value in {"loss": loss, **terms}.items():
        value = value.detach().float() * batch
        sums[name] = sums[name] + value if name in sums else value


def _epoch_row(job, epoch, sums, hits, seen, seconds, lr) -> dict[str, Any]:
    names = list(sums)
    seen_t = torch.tensor(float(seen), device=job.device)
    stacked = torch.stack([sums[n] for n in names] + [h.float() for h in hits] + [seen_t])
    totals = all_reduce_sum(stacked, job.world).tolist()
    count = totals[-1]
    row: dict[str, Any] = {"epoch": epoch + 1}
    row.update({f"train_{n}": v / count for n, v in zip(names, totals)})
    if not math.isfinite(row["train_loss"]):
        raise KdError(f"the training loss became {row['train_loss']} in epoch {epoch + 1}; {_remedies(job)}")
    if job.task.train_metric:  # (detection counts nothing right in training: its pass gives losses)
        row[f"train_{job.task.train_metric}"] = 100.0 * totals[-3] / max(totals[-2], 1.0)
    row["lr"] = lr
    row["images_per_s"] = count / seconds
    row["seconds"] = seconds
    return row


def _evaluate(job: Training, method: Distiller, epoch: int) -> dict[str, float]:
    """The epoch's scores, the student's and its peers' (`NAME_val_top1`, `NAME_val_miou`, ...): on the
    validation split when there is one (the test split waits for the end)."""
    split, loader = ("val", job.val_loader) if job.val_loader is not None else ("test", job.test_loader)
    row = _score(job, method.student, loader, split, epoch + 1)
    for name, peer in method.peer_models().items():
        row.update({f"{name}_{key}": value for key, value in _score(job, peer, loader, split, epoch + 1).items()})
    return row


def _score(job: Training, model: torch.nn.Module, loader, split: str, epoch: int) -> dict[str, float]:
    """`<split>_<metric>` and `<split>_loss` (none for detection), plus the task's other scalars
    (segmentation: pixel accuracy; detection: mAP50, mAP75, AR100)."""
    scored = score(model, loader, job.device, job.eval_dtype or job.dtype, job.task.new_score(job.num_classes))
    scores = scored.result()
    # (a detector's evaluation gives boxes and no loss: then whether every output was finite decides)
    loss = scores.get("loss", 0.0 if scored.all_finite else math.nan)
    if not math.isfinite(loss):  # a score from NaN outputs would be reported as a real accuracy
        raise KdError(
            f"the {split} loss became {loss} in epoch {epoch} (the model's outputs are not finite); {_remedies(job)}"
        )
    return {f"{split}_{name}": value for name, value in scores.items()}


def _remedies(job: Training) -> str:
    """What may keep the loss finite, for the run as it is set (fp32 is no remedy when it runs in fp32)."""
    steps = ["lower optim.lr", "set trainer.grad_clip"]
    if job.dtype != torch.float32:
        steps.append("use trainer.precision=fp32")
    input_size = getattr(job.method.student, "kd_input_shape", (0, 0, 0))[-1]
    if 0 < input_size < 8:  # a deep net's BatchNorm on 1-4 pixel maps: statistics of a handful of values
        steps.append(f"use images larger than {input_size} px or a smaller model")
    return ", ".join(steps[:-1]) + f", or {steps[-1]}"


def _track_best(job: Training, state: dict, row: dict, method: Distiller) -> None:
    key = f"{'val' if job.val_loader is not None else 'test'}_{job.task.metric}"
    if key in row and row[key] > state["best"]["score"]:
        state["best"] = {"score": row[key], "epoch": row["epoch"]}
        if job.val_loader is not None:  # the chosen weights, kept to be tested (and saved) at the end
            state["best_state"] = {k: v.detach().clone() for k, v in method.student.state_dict().items()}


def _checkpoint(method: Distiller, optimizer, epochs_done: int, state: dict) -> dict:
    return {
        "epoch": epochs_done,
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "history": state["history"],
        "best": state["best"],
        **({"best_state": state["best_state"]} if "best_state" in state else {}),
    }


def _resume_state(job: Training, method: Distiller, optimizer) -> dict:
    """Fresh state, or the state of checkpoints/last.pt when the run directory has one."""
    path = (job.resume_from or job.run.path) / LAST
    if not path.exists():
        return {"epoch": 0, "history": [], "best": {"score": -1.0, "epoch": 0}, "resumed_from": 0}
    saved = load_resume_state(path)
    try:
        method.load_state_dict(saved["method"])
        optimizer.load_state_dict(saved["optimizer"])
    except (KeyError, RuntimeError, ValueError) as error:
        reason = str(error).splitlines()[0][:200]
        raise KdError(
            f"{path} does not match this run's model/method ({reason}); resume with the same config or start a new run"
        ) from None
    set_rng_state(saved["rng"])
    if "top1" in saved["best"]:  # a checkpoint of kd before tasks named the best score by its metric
        saved["best"] = {"score": saved["best"]["top1"], "epoch": saved["best"]["epoch"]}
    log.info(f"resuming {job.title} from {path} after epoch {saved['epoch']}")
    return {**saved, "resumed_from": saved["epoch"]}
