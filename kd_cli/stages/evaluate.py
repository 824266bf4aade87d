"""`kd evaluate`: score any saved model (run directory or model.safetensors) on a split: for a
classifier top-1/top-5, NLL, ECE, per-class accuracy, confusion matrix and agreement with a teacher when
one is given; for a segmenter mIoU, pixel and mean class accuracy, per-class IoU and the pixel confusion
matrix; for both parameters, MACs, size and latency."""

from __future__ import annotations

import csv
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_cli.compress import is_int8
from kd_cli.data import load_dataset
from kd_cli.engine.artifacts import ModelSpec, load_model, load_spec, resolve_weights
from kd_cli.engine.metrics import predict, score
from kd_cli.engine.rundir import COMPLETE, CONFIG, RunDir
from kd_cli.errors import KdError
from kd_cli.models import model_task
from kd_cli.saved_forms import rebuild
from kd_cli.stages.data import eval_loader, saved_dataset
from kd_cli.stages.lifecycle import start_run
from kd_cli.stages.models import check_model_fits, count_parameters
from kd_cli.stages.results import print_results
from kd_cli.stages.setup import setup_run
from kd_cli.tasks import get_task
from kd_cli.tasks.classification import classification_report

log = logging.getLogger("kd")
SPLITS = ("test", "train", "val")


def main(cfg: DictConfig, run: RunDir) -> float:
    if cfg.split not in SPLITS:
        raise KdError(f"split={cfg.split} is not one of {', '.join(SPLITS)}")
    started = time.time()
    setup = setup_run(cfg)
    weights = resolve_weights(cfg.run)
    teacher_spec = load_spec(resolve_weights(cfg.teacher_run)) if cfg.teacher_run else None  # before any work
    model, spec = load_model(weights, setup.device)
    device, dtype = setup.device, setup.eval_dtype
    if _device_of(model).type != setup.device.type:  # int8 kernels run on the CPU only
        device, dtype = _device_of(model), torch.float32
        log.info(f"evaluate: {weights} holds int8 weights; it runs on the CPU")
    data = load_dataset(_dataset_config(cfg, weights))
    check_model_fits(spec, data, weights, "model")
    if teacher_spec is not None:
        check_model_fits(teacher_spec, data, Path(cfg.teacher_run), "teacher")
    split = {"test": data.test, "train": data.train, "val": data.val}[cfg.split]
    if split is None:
        raise KdError(
            f"{spec.dataset} has no validation split in this model's data config; use split=test or "
            "split=train, or set dataset.val_fraction"
        )
    start_run(
        cfg, run, setup, device=str(setup.device), seed=cfg.seed, data_fingerprint=data.fingerprint, model=str(weights)
    )
    loader = eval_loader(cfg, split, spec, device)
    if data.task == "detection":
        ids = data.category_ids or list(range(spec.num_classes))
        return evaluate_boxes(cfg, run, model, spec, weights, loader, (device, dtype), started, ids)
    if data.task != "classification":
        return evaluate_dense(cfg, run, model, spec, weights, loader, (device, dtype), started)
    logits, labels = predict(model, loader, device, dtype)
    if not torch.isfinite(logits).all():
        raise KdError(
            f"{weights} gives non-finite outputs (NaN or inf) on {int((~torch.isfinite(logits)).any(1).sum())} "
            f"of {len(logits)} images; its weights are broken: retrain it"
        )
    report = classification_report(logits, labels, spec.num_classes)
    confusion = report.pop("confusion")
    summary = {
        "stage": "evaluate",
        "model": str(weights),
        "arch": spec.arch,
        "dataset": spec.dataset,
        "split": cfg.split,
        **report,
        **model_figures(cfg, model, spec, weights, device),
    }
    if cfg.teacher_run:
        summary["teacher_agreement"] = teacher_agreement(cfg.teacher_run, loader, logits, device, dtype)
    write_confusion(run.path, confusion, spec.class_names)
    write_per_class(run.path / "per_class.csv", spec.class_names, report["per_class_accuracy"])
    run.write_summary(COMPLETE, **summary, wall_time_s=time.time() - started)
    print_results(
        f"evaluate {spec.arch} on {spec.dataset} ({cfg.split}, {report['num_samples']} images)",
        [
            ("top-1 %", summary["top1"]),
            ("top-5 %", summary["top5"]),
            ("NLL", summary["nll"]),
            ("ECE %", summary["ece"]),
            *figure_rows(cfg, summary),
            *([("agreement with teacher %", summary["teacher_agreement"])] if cfg.teacher_run else []),
        ],
        run.path,
    )
    return summary["top1"]


def evaluate_boxes(
    cfg: DictConfig,
    run: RunDir,
    model: nn.Module,
    spec: ModelSpec,
    weights: Path,
    loader,
    where,
    started: float,
    category_ids: list[int],
) -> float:
    """A detector scored over the split by COCOeval: AP, AP50, AP75, AP and AR by object size, per-class AP
    (per_class.csv), the detections as a COCO results file (detections.json), size and speed figures."""
    from kd_cli.engine.files import atomic_write
    from kd_cli.tasks.coco_map import results

    device, dtype = where
    if cfg.teacher_run:
        raise KdError("teacher_run= (top-1 agreement with a teacher) is for classifiers; remove it")
    task = get_task("detection")
    scores = score(model, loader, device, dtype, task.new_score(spec.num_classes))
    if not scores.all_finite:
        raise KdError(f"{weights} gives non-finite boxes or scores (NaN or inf); its weights are broken: retrain it")
    report = scores.report()
    summary = {
        "stage": "evaluate",
        "model": str(weights),
        "arch": spec.arch,
        "dataset": spec.dataset,
        "task": task.name,
        "metric": task.metric,
        "split": cfg.split,
        **report,
        **model_figures(cfg, model, spec, weights, device),
    }
    write_per_class(run.path / "per_class.csv", spec.class_names, report["per_class_ap"], "ap")
    detections = results(cast(Any, scores).predictions, category_ids)  # the data's own image and category ids
    atomic_write(run.path / "detections.json", lambda path: path.write_text(json.dumps(detections)))
    run.write_summary(COMPLETE, **summary, wall_time_s=time.time() - started)
    print_results(
        f"evaluate {spec.arch} on {spec.dataset} ({cfg.split}, {report['num_images']} images, "
        f"{report['num_boxes']} boxes)",
        [
            ("mAP@[.5:.95] %", summary["map"]),
            ("AP50 %", summary["map50"]),
            ("AP75 %", summary["map75"]),
            ("AR@100 %", summary["mar100"]),
            ("VOC AP50 % (all-point)", summary["voc_ap50"]),
            *figure_rows(cfg, summary),
        ],
        run.path,
    )
    return summary["map"]


def evaluate_dense(
    cfg: DictConfig, run: RunDir, model: nn.Module, spec: ModelSpec, weights: Path, loader, where, started: float
) -> float:
    """A segmentation model scored over the split in one pass: mIoU, pixel and mean class accuracy,
    per-class IoU (per_class.csv), the pixel confusion matrix, and the same size and speed figures."""
    device, dtype = where
    if cfg.teacher_run:
        raise KdError("teacher_run= (top-1 agreement with a teacher) is for classifiers; remove it")
    task = get_task(model_task(spec.arch))
    scores = score(model, loader, device, dtype, task.new_score(spec.num_classes))
    if not scores.all_finite:
        raise KdError(f"{weights} gives non-finite outputs (NaN or inf); its weights are broken: retrain it")
    report = scores.report()
    confusion = report.pop("confusion")
    summary = {
        "stage": "evaluate",
        "model": str(weights),
        "arch": spec.arch,
        "dataset": spec.dataset,
        "task": task.name,
        "metric": task.metric,
        "split": cfg.split,
        **report,
        **model_figures(cfg, model, spec, weights, device),
    }
    write_confusion(run.path, confusion, spec.class_names)
    write_per_class(run.path / "per_class.csv", spec.class_names, report["per_class_iou"], "iou")
    run.write_summary(COMPLETE, **summary, wall_time_s=time.time() - started)
    print_results(
        f"evaluate {spec.arch} on {spec.dataset} ({cfg.split}, {report['num_pixels']:,} pixels)",
        [
            ("mIoU %", summary["miou"]),
            ("pixel accuracy %", summary["pixel_acc"]),
            ("mean class accuracy %", summary["mean_class_acc"]),
            *figure_rows(cfg, summary),
        ],
        run.path,
    )
    return summary["miou"]


def model_figures(cfg: DictConfig, model: nn.Module, spec: ModelSpec, weights: Path, device) -> dict[str, Any]:
    """Parameters, multiply-adds, size on disk and latency: what every task's evaluation reports."""
    return {
        "params": count_parameters(model),
        "macs": count_macs(float_twin(model, spec), spec, _device_of(model)),
        "size_bytes": weights.stat().st_size,
        "latency_ms": measure_latency(model, spec, device, cfg.latency_batch_size, cfg.latency_batches),
        "latency_batch_size": cfg.latency_batch_size,
        "device": str(device),
    }


def figure_rows(cfg: DictConfig, summary: dict) -> list[tuple[str, Any]]:
    """The printed rows of `model_figures`."""
    return [
        ("parameters", summary["params"]),
        ("MACs", summary["macs"]),
        ("size on disk (bytes)", summary["size_bytes"]),
        (f"latency ms / batch of {cfg.latency_batch_size}", summary["latency_ms"]),
    ]


def _dataset_config(cfg: DictConfig, weights: Path) -> dict:
    """The data set given on the command line, else the one the model was trained on."""
    if cfg.dataset is not None:
        return cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True))
    saved = saved_dataset(weights)
    if saved is None:
        raise KdError(f"no {CONFIG} beside {weights} to tell its data set; pass dataset=NAME (and its options)")
    return saved


def float_twin(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """For an int8 model, the float network of the same shape (torch's counter skips int8 ops);
    the multiply-adds are the same, done in 8 bits. Other models are returned as they are."""
    if not is_int8(spec.extra):
        return model
    return rebuild(spec.build(), spec.extra["transforms"][:-1]).eval()


def _device_of(model: nn.Module) -> torch.device:
    return next((t.device for t in model.state_dict().values() if isinstance(t, torch.Tensor)), torch.device("cpu"))


def count_macs(model: nn.Module, spec: ModelSpec, device: torch.device) -> int:
    """Multiply-accumulates for one image (FLOPs / 2, counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    sample = torch.zeros(1, spec.in_channels, spec.input_size, spec.input_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(sample)
    return counter.get_total_flops() // 2


@torch.no_grad()
def measure_latency(model: nn.Module, spec: ModelSpec, device: torch.device, batch: int, batches: int) -> float:
    """Median milliseconds per batch, after warm-up batches (which absorb one-off allocation costs). On the
    CPU with one thread: with several, a busy machine's other work decides the figure (a 2-thread
    measurement on a loaded machine gave one model 3.4 and 185 ms), and before/after ratios mean nothing."""
    images = torch.randn(batch, spec.in_channels, spec.input_size, spec.input_size, device=device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        times = []
        for i in range(batches + 3):
            _sync(device)
            start = time.perf_counter()
            model(images)
            _sync(device)
            if i >= 3:
                times.append(1000 * (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_agreement(teacher_path: str, loader, logits: torch.Tensor, device: torch.device, dtype) -> float:
    teacher, _ = load_model(teacher_path, device)
    teacher_logits, _ = predict(teacher, loader, _device_of(teacher), dtype)
    if teacher_logits.shape != logits.shape:
        raise KdError(f"teacher {teacher_path} predicts {teacher_logits.shape[1]} classes, the model {logits.shape[1]}")
    return 100.0 * (teacher_logits.argmax(1) == logits.argmax(1)).float().mean().item()


def write_confusion(directory: Path, confusion: torch.Tensor, class_names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    size = min(4 + n * 0.35, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion.numpy(), cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        for (i, j), value in zip(((i, j) for i in range(n) for j in range(n)), confusion.flatten().tolist()):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(directory / "confusion.png", dpi=100)
    plt.close(fig)


def write_per_class(path: Path, class_names: list[str], accuracy: list[float], column: str = "top1") -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", column])
        writer.writerows(zip(class_names, accuracy))
