"""A Hydra callback that makes a sweep's exit status honest whatever the launcher.

The basic launcher runs jobs in this process, where `stages.common.guarded` records a failed job
for the CLI to report after Hydra returns. Joblib, submitit and SLURM run jobs in other processes,
so their failures never reach this one; after the last job, this callback reads every job's
summary.json in the sweep folder and records the failures the same way (one line, exit non-zero).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kd_cli.engine.files import read_json
from kd_cli.engine.rundir import COMPLETE, SUMMARY
from kd_cli.errors import KdError


class SweepStatus(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kd_cli.stages import common

        if common._errors:  # already recorded in-process (basic launcher)
            return
        unfinished = unfinished_jobs(Path(str(config.hydra.sweep.dir)))
        if unfinished:
            path, status, message = unfinished[0]
            common._errors.append(KdError(f"{len(unfinished)} job(s) of the sweep did not complete, e.g. {path}: "
                                          f"{status}{': ' + message if message else ''}"))


def unfinished_jobs(sweep_dir: Path) -> list[tuple[Path, str, str]]:
    """(run dir, status, error) of every job whose summary.json is not `complete`."""
    found = []
    for summary in sorted(sweep_dir.glob(f"**/{SUMMARY}")):
        try:
            data = read_json(summary)
        except ValueError:
            data = {"status": "unreadable"}
        if data.get("status") != COMPLETE:
            found.append((summary.parent, str(data.get("status")), str(data.get("error") or "")))
    return found
