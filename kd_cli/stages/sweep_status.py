"""A Hydra callback that gives a sweep its folder and makes its exit status honest whatever the launcher.

At the start, the sweep takes its folder's lock for as long as it launches jobs, and refuses a folder
that already holds runs (re-running a sweep into it would take over its jobs) unless the command is
`resume=` that folder. The basic launcher runs jobs in this process, where `stages.common.guarded` hands
a failed job's error for the CLI to report after Hydra returns. Joblib, submitit and SLURM run jobs in other processes,
so their failures never reach this one; after the last job, this callback reads every job's
summary.json in the sweep folder and records the failures the same way (one line, exit non-zero).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kd_cli.engine.files import read_json
from kd_cli.engine.lock import DirectoryLock
from kd_cli.engine.rundir import COMPLETE, SUMMARY, enclosing, holds_run, holds_sweep
from kd_cli.errors import KdError, Refusal, hand_over, one_line


class SweepStatus(Callback):
    def __init__(self) -> None:
        self.lock: DirectoryLock | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        resume = config.get("resume")
        resuming = resume is not None and Path(str(resume)).expanduser().resolve() == sweep_dir.resolve()
        try:  # (Hydra turns an Exception raised here into a warning and sweeps on)
            if sweep_dir.is_dir() and not resuming and _holds_runs(sweep_dir):
                hint = f"continue that sweep with resume={sweep_dir}, or " if "resume" in config else ""
                raise KdError(f"{sweep_dir} already holds a sweep's runs; {hint}choose another hydra.sweep.dir")
            outer = (
                holds_run(sweep_dir)
                and sweep_dir
                or enclosing(sweep_dir, holds_run)
                or enclosing(sweep_dir, holds_sweep)
            )
            if outer:
                raise KdError(
                    f"hydra.sweep.dir={sweep_dir} is {'inside ' if outer != sweep_dir else ''}the folder of "
                    f"another run or sweep ({outer}); choose a folder outside any run"
                )
            check_every_job(config)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            self.lock = DirectoryLock.acquire(
                sweep_dir, f"wait for that sweep to finish, or stop it and continue it with resume={sweep_dir}"
            )
            self.lock.record_owner()
        except KdError as error:
            raise Refusal(error) from None
        except OSError as error:
            raise Refusal(
                KdError(
                    f"cannot create the sweep folder {sweep_dir} ({error.strerror}); choose a folder "
                    f"you can write (hydra.sweep.dir= or paths.outputs=)"
                )
            ) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

        unfinished = unfinished_jobs(Path(str(config.hydra.sweep.dir)))
        if unfinished:
            path, status, message = unfinished[0]
            # (A job that failed in this process, with the basic launcher, has handed over its error already:
            # that first error is the one reported.)
            hand_over(
                KdError(
                    f"{len(unfinished)} job(s) of the sweep did not complete, e.g. {path}: "
                    f"{status}{': ' + message if message else ''}"
                )
            )


def check_every_job(config: DictConfig) -> None:
    """Every job's values, checked before the first job runs (a bad value in the last job must not
    wait for the others to train). Only for Hydra's basic sweeper, whose jobs are known in advance
    (a search such as Optuna draws its values as it goes; those are checked as each job starts)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from omegaconf import open_dict

    from kd_cli.stages.checks import check_config

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    loader = GlobalHydra.instance().config_loader()
    for number, job in enumerate(jobs):
        try:
            cfg = loader.load_configuration(config.hydra.job.config_name, list(job), run_mode=RunMode.MULTIRUN)
            with open_dict(cfg):
                del cfg["hydra"]
            check_config(cfg, list(job))
        except Exception as error:  # noqa: BLE001 - kd's refusals and Hydra's composition errors alike
            raise KdError(f"job {number} of the sweep ({' '.join(job)}): {one_line(error)}; no job was run") from None


def _holds_runs(sweep_dir: Path) -> bool:
    return (sweep_dir / "multirun.yaml").exists() or any(holds_run(job) for job in sweep_dir.iterdir() if job.is_dir())


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
