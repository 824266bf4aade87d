"""The end of a training run: summary.json with `status: complete` (written last), the rows and table it
prints, and the value a sweeper optimises."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from kd_cli.console import print_table
from kd_cli.engine.loop import FitResult
from kd_cli.engine.rundir import COMPLETE, PEERS, RunDir
from kd_cli.stages.models import count_parameters
from kd_cli.tasks import get_task


def finish(run: RunDir, cfg: DictConfig, result: FitResult, model: nn.Module, started: float, **extra: Any) -> dict:
    """Write summary.json with status complete (last, so its presence means the run is whole)."""
    last = result.last
    metric = result.metric
    summary = {
        "stage": cfg.stage,
        "dataset": cfg.dataset.name,
        "method": cfg.method.name,
        "seed": cfg.seed,
        "epochs": last.get("epoch", 0),
        "task": result.task,
        "metric": metric,  # the headline score's name: best_<metric>, last_<metric>, teacher_<metric>
        f"best_{metric}": result.best_score,
        "best_epoch": result.best_epoch,
        "selected_on": result.selected_on,
        f"best_val_{metric}": result.best_val_score,
        f"last_{metric}": result.last_score,
        **({"pixel_acc": last.get("test_pixel_acc")} if metric == "miou" else {}),
        **({"last_map50": last.get("test_map50")} if metric == "map" else {}),
        "last_train_loss": last.get("train_loss"),
        "params": count_parameters(model),
        "images_per_s": last.get("images_per_s"),
        "resumed_from_epoch": result.resumed_from,
        "wall_time_s": time.time() - started,
        "teacher_cache": result.teacher_cache,
        # online distillation: each peer's test score (last weights) and where it is saved
        "peers": {
            name: {f"last_{metric}": value, "path": f"{PEERS}/{name}"}
            for name, value in result.peers_last_score.items()
        }
        or None,
        **extra,
    }
    run.write_summary(COMPLETE, **summary)
    return summary


def selection_rows(summary: dict, who: str = "") -> list[tuple[str, Any]]:
    """The final table's score rows (top-1, mIoU: the task's metric), each saying which split chose the
    epoch it reports."""
    task = get_task(summary.get("task", "classification"))
    who, label, key = f"{who} " if who else "", task.metric_label, task.metric
    if summary.get("selected_on") == "val":
        return [
            (f"{who}test {label} (best epoch on validation: {summary['best_epoch']})", summary[f"best_{key}"]),
            (f"{who}validation {label} (best)", summary[f"best_val_{key}"]),
            (f"{who}test {label} (last)", summary[f"last_{key}"]),
        ]
    return [
        (f"{who}test {label} (last)", summary[f"last_{key}"]),
        (f"{who}test {label} (best on test: literature comparison only)", summary[f"best_{key}"]),
    ]


def objective(result: FitResult) -> float:
    """What a sweeper optimises: validation top-1 when there is a validation split (never the test set's
    when it can be avoided), else the test-set best."""
    if result.selected_on == "val":
        assert result.best_val_score is not None  # set whenever a validation split chose the epoch
        return result.best_val_score
    return result.best_score


def print_results(title: str, rows: list[tuple[str, Any]], run_dir: Path) -> None:
    """The final table; the run directory below it."""
    cells = [
        [name, f"{value:.2f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)]
        for name, value in rows
    ]
    print_table(title, [("", "left"), ("value", "right")], cells, notes=[f"run directory: {run_dir}"])
