"""Progress display: rich bars on a terminal, one log line per epoch elsewhere (files, CI, pipes)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kd")
SHOW_LOSS_EVERY = 20  # batches between loss readings on the bar (each reading waits for the GPU)


def make_reporter(mode: str, title: str, epochs: int, steps: int):
    if mode not in ("auto", "bar", "plain", "none"):
        from kd_cli.errors import KdError

        raise KdError(f"trainer.progress={mode} is not one of auto, bar, plain, none")
    if mode == "bar" or (mode == "auto" and sys.stdout.isatty()):
        return BarReporter(title, epochs, steps)
    return PlainReporter(title, epochs, quiet=mode == "none")


def format_row(row: dict[str, Any]) -> str:
    parts = []
    for key, value in row.items():
        if key == "epoch":
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


class PlainReporter:
    def __init__(self, title: str, epochs: int, quiet: bool = False):
        self.title, self.epochs, self.quiet = title, epochs, quiet

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def step(self, loss: Callable[[], Any]) -> None:
        """One batch done; `loss()` gives its loss tensor (read only when shown: reading syncs the GPU)."""

    def start_epoch(self, epoch: int) -> None:
        pass

    def end_epoch(self, row: dict[str, Any]) -> None:
        if not self.quiet:
            log.info(f"[{self.title}] epoch {row['epoch']}/{self.epochs}  {format_row(row)}")


class BarReporter(PlainReporter):
    """Two bars (epochs, batches) with loss, images/s and ETA; epoch lines still go to the log file."""

    def __init__(self, title: str, epochs: int, steps: int):
        super().__init__(title, epochs)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.steps = steps
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=True,
        )

    def __enter__(self):
        self.progress.start()
        self.epoch_task = self.progress.add_task(self.title, total=self.epochs, info="")
        self.batch_task = self.progress.add_task("  batches", total=self.steps, info="")
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False

    def start_epoch(self, epoch: int) -> None:
        self.done = 0
        self.progress.reset(self.batch_task, total=self.steps, info="")

    def step(self, loss: Callable[[], Any]) -> None:
        self.done += 1
        if self.done % SHOW_LOSS_EVERY == 1:
            self.progress.update(self.batch_task, advance=1, info=f"loss {float(loss()):.4f}")
        else:
            self.progress.update(self.batch_task, advance=1)

    def end_epoch(self, row: dict[str, Any]) -> None:
        info = f"{score_text(row)}  {row.get('images_per_s', 0):.0f} img/s"
        self.progress.update(self.epoch_task, completed=row["epoch"], info=info)
        line = f"[{self.title}] epoch {row['epoch']}/{self.epochs}  {format_row(row)}"
        self.progress.console.print(line, highlight=False, markup=False)
        log_to_files_only(line)


def log_to_files_only(message: str) -> None:
    """Keep the run's log file complete while the console shows bars instead of log lines."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


# The epoch's score as the bar shows it: the split it was read on (validation when there is one) and the
# task's metric.
SCORES = (("val_top1", "val top-1"), ("test_top1", "test top-1"), ("val_miou", "val mIoU"), ("test_miou", "test mIoU"))


def score_text(row: dict[str, Any]) -> str:
    return next((f"{label} {row[key]:.2f}" for key, label in SCORES if key in row), "not scored this epoch")
