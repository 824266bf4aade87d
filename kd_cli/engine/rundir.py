"""The run directory: the unit every stage writes and every later stage reads.

summary.json carries `status`; `complete` is written last, so a directory without it is an
unfinished run (failed, interrupted, or still going). A run directory has one writer, which holds
its lock (engine/lock.py) for the whole run: `running` with nobody holding the lock is a run that
was killed (`stale`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_cli.engine.files import (
    atomic_write,
    leftover_temporary_files,
    read_json,
    write_json,
)
from kd_cli.engine.lock import holder
from kd_cli.errors import WARNINGS, KdError

SUMMARY = "summary.json"
METRICS = "metrics.csv"
ENV = "env.json"
CONFIG = "config_resolved.yaml"
COMPLETE, FAILED, INTERRUPTED, RUNNING = "complete", "failed", "interrupted", "running"
STALE = "stale"  # what readers call a `running` run whose writer is gone
SWEEP_RECORD = "multirun.yaml"  # Hydra's record of a sweep, in its folder
# Files whose presence means a directory holds a run (it is never written into again but by resume=).
RUN_FILES = (SUMMARY, CONFIG, "checkpoints/last.pt", ".hydra/overrides.yaml", "model.safetensors")
# Space set aside while a run writes, freed to record `failed` when the disk fills up.
RESERVE = ".kd.reserve"
REPRODUCTION = "reproduce.json"  # written by kd reproduce into the new run it makes
PEERS = "peers"  # online distillation: each of the student's peers is a model of its own in RUN/peers/NAME
RESERVE_BYTES = 256 * 1024


class RunDir:
    def __init__(self, path: str | Path, previous: dict[str, Any] | None = None, lock: Any = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.previous = previous or {}  # summary.json as it was before this process (a resumed run's)
        self.lock = lock  # the DirectoryLock this process holds on it (engine/lock.py), if any
        self.sticky: dict[str, Any] = {}  # fields every later summary of this process keeps
        self.started = False  # True once begin() wrote the run: before that nothing is written

    def begin(self, cfg: DictConfig, env: dict[str, Any], **fields: Any) -> None:
        """The run exists from here on: config, environment and a `running` summary."""
        self.started = True
        if self.lock is not None:
            self.lock.record_owner()  # (not before: a process refused until now leaves the lock file as it was)
        _reserve_space(self.path / RESERVE)
        self.write_config(cfg)
        self.write_env(**env)
        self.write_summary(RUNNING, **fields)

    def keep(self, **fields: Any) -> None:
        """Record `fields` now and in every later summary (e.g. the teacher a run uses, its resumes)."""
        self.sticky.update(fields)
        if self.started:
            current = self.summary()
            self.write_summary(current.pop("status", RUNNING), **current)

    def record_stop(self, status: str, message: str, wall_time_s: float) -> bool:
        """`failed`/`interrupted` (never over `complete`), even on a full disk: the reserve is freed first
        if the write fails. False when there was nothing to record (not started, or complete)."""
        if not self.started or self.summary().get("status") == COMPLETE:
            return False
        fields = {**self.summary(), "error": message, "wall_time_s": wall_time_s}
        fields.pop("status", None)
        try:
            self.write_summary(status, **fields)
        except OSError:
            (self.path / RESERVE).unlink(missing_ok=True)
            self.write_summary(status, **fields)
        return True

    def close(self) -> None:
        """Leave nothing temporary behind: the reserve and stray temporary files of killed writers, in
        the run's own folders only (the lock is the caller's)."""
        (self.path / RESERVE).unlink(missing_ok=True)
        if self.started:
            for folder in self._own_folders():
                for leftover in leftover_temporary_files(folder):
                    leftover.unlink(missing_ok=True)

    def _own_folders(self) -> list[Path]:
        """The folders this run writes: itself, .hydra/, checkpoints/, float/ and its born-again generations."""
        generations = sorted(self.path.glob("generation-*"))
        roots = [self.path, *generations]
        return [folder for root in roots for folder in (root, root / ".hydra", root / "checkpoints", root / "float")]

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def write_config(self, cfg: DictConfig) -> None:
        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(self / CONFIG, lambda tmp: tmp.write_text(text))

    def write_env(self, **facts: Any) -> None:
        write_json(self / ENV, {**environment(), **facts})

    def write_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        """Rewrite metrics.csv from the whole history (consistent with the checkpoint on resume)."""
        rows = list(rows)
        columns: list[str] = []
        for row in rows:
            columns += [key for key in row if key not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self / METRICS, lambda tmp: tmp.write_text(buffer.getvalue()))

    def write_summary(self, status: str, **fields: Any) -> None:
        warnings = {"warnings": list(WARNINGS)} if WARNINGS else {}
        write_json(self / SUMMARY, {"status": status, **fields, **self.sticky, **warnings})

    def summary(self) -> dict[str, Any]:
        return read_summary(self.path)


def read_summary(path: Path) -> dict[str, Any]:
    try:
        return read_json(Path(path) / SUMMARY)
    except (OSError, json.JSONDecodeError):
        return {}


def is_complete(path: Path) -> bool:
    return read_summary(path).get("status") == COMPLETE


def holds_run(path: Path) -> bool:
    return any((Path(path) / name).exists() for name in RUN_FILES)


def holds_kd_record(path: Path) -> bool:
    """Whether a folder that holds run files holds kd's record of a run (one kd can resume), not another
    tool's files of the same names."""
    return (Path(path) / CONFIG).exists() or (Path(path) / ".hydra" / "overrides.yaml").exists()


def holds_sweep(path: Path) -> bool:
    return (Path(path) / SWEEP_RECORD).exists()


def enclosing(path: Path, holds: Callable[[Path], bool]) -> Path | None:
    """The nearest folder above `path` that `holds` a run (or a sweep), if any."""
    return next((parent for parent in Path(path).resolve().parents if holds(parent)), None)


def run_status(path: Path, summary: dict[str, Any] | None = None) -> str:
    """summary.json's status (`summary`, else read), except that a `running` run nobody writes any more
    (killed by kill -9 or a power cut: it never recorded its end) is `stale`. Without a status: `running`
    while its lock is held (it is starting), else `unknown`."""
    status = (read_summary(path) if summary is None else summary).get("status")
    if status is None:
        return RUNNING if holder(path) is not None else "unknown"
    return STALE if status == RUNNING and holder(path) is None else str(status)


def _reserve_space(path: Path) -> None:
    try:
        with open(path, "wb") as handle:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, RESERVE_BYTES)
            else:  # pragma: no cover
                handle.write(bytes(RESERVE_BYTES))
    except OSError:  # a full disk already: nothing to set aside
        path.unlink(missing_ok=True)


def environment() -> dict[str, Any]:
    """Versions, machine and code revision, so a result can be traced and reproduced."""
    import hydra
    import torch
    import torchvision

    from kd_cli import __version__

    return {
        "kd": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "hydra": hydra.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "git_sha": git_sha(),
        "argv": sys.argv,
    }


def git_sha() -> str | None:
    """The commit of the kd source tree, when it runs from a git checkout."""
    source = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def output_file(path: Path, option: str, overwrite: bool, replace_with: str, reads: Iterable[Path] = ()) -> Path:
    """Where a command writes a file of its own (kd predict's CSV, kd report's tables), checked before any
    work: never a device or FIFO, a folder, a file inside a run directory (it has one writer), one of the
    files the command reads, or an existing file without `overwrite` (`replace_with`: how the user asks
    for it, e.g. `overwrite=true`). Returns the path to write: a
    symlink's target (written through, not replaced by a file)."""
    from kd_cli.engine.files import unwritable

    path = Path(path).expanduser()
    target = path.resolve() if path.is_symlink() else path.absolute()
    if target.exists() and not target.is_file() and not target.is_dir():
        raise KdError(f"{option}={path} is not a regular file (a device, a FIFO); give a file path")
    if target.is_dir():
        raise KdError(f"{option}={path} is a folder; give a file path inside it")
    run = target.parent if holds_run(target.parent) else enclosing(target.parent, holds_run)
    if run is not None:
        raise KdError(f"{option}={path} is inside the run directory {run}, which only its run writes; write elsewhere")
    if any(target == Path(read).expanduser().resolve() for read in reads):
        raise KdError(f"{option}={path} is one of the files this command reads; write elsewhere")
    if target.exists() and not overwrite:
        raise KdError(f"{option}={path} exists; choose another file, or pass {replace_with} to replace it")
    if problem := unwritable(target):
        raise KdError(f"cannot write {option}={path} ({problem}); choose another file")
    return target
