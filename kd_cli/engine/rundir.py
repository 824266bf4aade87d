"""The run directory: the unit every stage writes and every later stage reads.

summary.json carries `status`; `complete` is written last, so a directory without it is an
unfinished run (failed, interrupted, or still going).
"""

from __future__ import annotations

import csv
import io
import json
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from kd_cli.engine.files import atomic_write, read_json, write_json

SUMMARY = "summary.json"
METRICS = "metrics.csv"
ENV = "env.json"
CONFIG = "config_resolved.yaml"
COMPLETE, FAILED, INTERRUPTED, RUNNING = "complete", "failed", "interrupted", "running"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

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
        write_json(self / SUMMARY, {"status": status, **fields})

    def summary(self) -> dict[str, Any]:
        return read_summary(self.path)


def read_summary(path: Path) -> dict[str, Any]:
    try:
        return read_json(Path(path) / SUMMARY)
    except (OSError, json.JSONDecodeError):
        return {}


def is_complete(path: Path) -> bool:
    return read_summary(path).get("status") == COMPLETE


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
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
