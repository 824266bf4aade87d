"""A run's life cycle, the same for every stage: claim the directory (lock, resume rules), hold the log
records until the run starts, `start_run` (the first write: .hydra/, config_resolved.yaml, env.json, a
`running` summary, the log file), and at the end the `failed`/`interrupted` record, the lock released,
the directory removed if the run never started."""

from __future__ import annotations

import logging
import logging.handlers
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import kd_cli.compress  # noqa: F401  (registers how a compressed model is rebuilt: kd_cli/saved_forms)
from kd_cli.engine.device import (
    use_channels_last,
)
from kd_cli.engine.files import atomic_write, read_json
from kd_cli.engine.lock import Owner
from kd_cli.engine.process import signals_held
from kd_cli.engine.rundir import ENV, FAILED, INTERRUPTED, RunDir
from kd_cli.errors import INTERRUPTED_RUNS, WARNINGS, KdError, hand_over, one_line
from kd_cli.stages.claim import Claim, claim_run_dir
from kd_cli.stages.setup import Setup

log = logging.getLogger("kd")


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def guarded(stage_main: Callable[[DictConfig, RunDir], Any], cfg: DictConfig) -> Any:
    """Run a stage in its run directory, which it holds alone from its first to its last write.

    Nothing is written before the stage has checked every value and read its inputs (`start_run`);
    a run that then stops records `failed`/`interrupted` in summary.json. In a sweep a failed job is
    recorded and the others go on; the command exits non-zero at the end.
    """
    path = output_dir()
    WARNINGS.clear()  # this job's own (a sweep runs several jobs in one process)
    log_buffer = LogBuffer()
    started = time.time()
    run: RunDir | None = None
    claim: Claim | None = None
    try:
        claim = _claim(cfg, path)
        if claim.finished:  # a complete job of a resumed sweep
            log.info(f"{path}: complete already (best top-1 {claim.previous.get('best_top1')}); kept as it is")
            return claim.previous.get("best_top1")
        run = RunDir(path, claim.previous, claim.lock)
        if claim.resuming:
            run.keep(resumes=[*claim.previous.get("resumes", []), _resume_record(claim)])
        return stage_main(cfg, run)
    except KeyboardInterrupt as interrupt:
        with signals_held():  # a second Ctrl-C must not cut the record short
            if run is not None and run.record_stop(
                INTERRUPTED, f"interrupted; continue with resume={path}", time.time() - started
            ):
                INTERRUPTED_RUNS.append(str(path))
        hand_over(interrupt)
        raise
    except Exception as error:
        _hand_over(error, path, run, claim, time.time() - started, cfg)
        return None
    finally:
        if run is not None:
            run.close()
        if claim is not None:
            claim.lock.release()
        log_buffer.close()
        if run is None or not run.started:
            _remove_if_empty(path)


def _claim(cfg: DictConfig, path: Path) -> Claim:
    if int(os.environ.get("RANK", "0")) != 0:  # other ranks write a scratch directory of their own
        return Claim(NoLock())  # type: ignore[arg-type]
    overrides = list(HydraConfig.get().overrides.task)
    return claim_run_dir(
        path,
        cfg.get("resume"),
        bool(cfg.get("resume_extend", False)),
        overrides,
        in_multirun(),
        resumable="resume" in cfg,
    )


class NoLock:
    def record_owner(self) -> None:
        pass

    def release(self) -> None:
        pass


def _hand_over(
    error: Exception, path: Path, run: RunDir | None, claim: Claim | None, seconds: float, cfg: DictConfig
) -> None:
    if run is not None and run.started:
        run.record_stop(FAILED, one_line(error), seconds)
    elif in_multirun() and claim is not None and not claim.resuming:
        # A sweep's job refused before it started still says so in its folder: launchers that run jobs
        # in other processes (joblib, SLURM) learn the sweep's outcome from the jobs' summaries.
        RunDir(path).write_summary(FAILED, stage=cfg.stage, error=one_line(error), started_run=False)
    if in_multirun():
        # the sweep goes on with its other jobs; its one `kd: error:` line comes when it ends
        started = run is not None and run.started
        what = "failed" if started else "was refused before it started"
        # (logged, on the console's stdout: stderr keeps the sweep's one error line for its end)
        log.warning(f"kd: warning: job {path} {what}: {one_line(error)}; the sweep goes on with its other jobs")
        error = KdError(
            f"a job of the sweep failed ({path}): {one_line(error)}" if started else f"{one_line(error)} (job {path})"
        )
    hand_over(error)


def _resume_record(claim: Claim) -> dict[str, Any]:
    owner = Owner.me()
    return {"at": owner.started, "host": owner.host, "pid": owner.pid, "changes": claim.changes}


def _remove_if_empty(path: Path) -> None:
    """A run that never started leaves no run directory behind. (The date folders above it are left:
    removing them could pull the floor from under another run being created in them at that moment.)"""
    try:
        path.rmdir()  # removes only an empty directory
    except OSError:
        pass


class LogBuffer:
    """Holds the job's log records until its run directory is written, then writes them (and every
    later record) to `<stage>.log` there; a job that never starts its run leaves no log file."""

    current: LogBuffer | None = None

    def __init__(self) -> None:
        self.memory = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        self.file: logging.Handler | None = None
        logging.getLogger().addHandler(self.memory)
        LogBuffer.current = self

    def write_to(self, path: Path) -> None:
        # (backslashreplace: a file name that is not UTF-8 is logged with \xNN escapes, not a logging error)
        self.file = logging.FileHandler(path, mode="a", encoding="utf-8", errors="backslashreplace")
        self.file.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
        self.memory.setTarget(self.file)
        self.memory.flush()
        logging.getLogger().removeHandler(self.memory)
        logging.getLogger().addHandler(self.file)

    def close(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self.memory)
        self.memory.setTarget(None)
        self.memory.close()
        if self.file is not None:
            root.removeHandler(self.file)
            self.file.close()
        LogBuffer.current = None


def start_run(cfg: DictConfig, run: RunDir, setup: Setup | None, **env: Any) -> None:
    """From here on the run directory is written: .hydra/, config_resolved.yaml, env.json, a `running`
    summary and <stage>.log. Called once every check has passed and the inputs have been read."""
    if setup is not None and not setup.world.is_main:
        return
    if run.previous:  # resuming: the same config and data as before, and the first part's environment kept
        _check_same_config(run, cfg)
        env = {**env, "earlier": _earlier_environments(run, env.get("data_fingerprint"))}
    if setup is not None:  # what `auto` became on this machine
        env = {**env, **_resolved_hardware_settings(cfg, setup)}
    if HydraConfig.initialized():  # (a stage called as a function, without the CLI, has no Hydra record)
        _write_hydra_files(run.path, cfg)
    run.begin(cfg, env, stage=cfg.stage, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if LogBuffer.current is not None:
        LogBuffer.current.write_to(run.path / f"{cfg.stage}.log")
    device = f"  device {setup.device}  precision {_name(setup.dtype)}" if setup else ""
    log.info(f"{cfg.stage}: run directory {run.path}{device}")


def _resolved_hardware_settings(cfg: DictConfig, setup: Setup) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "device": str(setup.device),
        "precision": _name(setup.dtype),
        "eval_precision": _name(setup.eval_dtype),
    }
    if "trainer" in cfg and "channels_last" in cfg.trainer:
        settings["channels_last"] = use_channels_last(cfg.trainer.channels_last, setup.device, setup.dtype)
    return settings


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _earlier_environments(run: RunDir, fingerprint: str | None) -> list[dict[str, Any]]:
    """env.json of the run's earlier part(s), after checking that it goes on with the same data."""
    try:
        before = read_json(run.path / ENV)
    except (OSError, ValueError):
        return []
    known = before.get("data_fingerprint")
    if fingerprint and known and fingerprint != known:
        raise KdError(
            f"the data differ from those {run.path} started with (data fingerprint {fingerprint}, "
            f"was {known}); a resumed run must see the same data: restore them, or start a new run"
        )
    earlier = before.pop("earlier", [])
    return [*earlier, before]


def _check_same_config(run: RunDir, cfg: DictConfig) -> None:
    """The config recomposed now must resolve to what the run started with, but for the accepted
    changes of this resume: else kd or a config file changed since, and the run would become a mix."""
    from kd_cli.engine.rundir import CONFIG
    from kd_cli.overrides import canonical, flatten
    from kd_cli.stages.claim import FREE_ON_RESUME, HOW_TO_RUN, read_saved

    before = flatten(read_saved(run.path / CONFIG) or {})
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    accepted = {
        change.split("=", 1)[0] for record in run.sticky.get("resumes", [])[-1:] for change in record["changes"]
    }

    def ignored(key: str) -> bool:
        free = any(key == p or key.startswith(p + ".") for p in FREE_ON_RESUME)
        return key.split(".")[0] in HOW_TO_RUN or key in accepted or free

    differ = [
        f"{key}: {before.get(key)} -> {now.get(key)}"
        for key in dict.fromkeys([*before, *now])
        if not ignored(key) and canonical(before.get(key)) != canonical(now.get(key))
    ]
    if differ:
        raise KdError(
            f"{run.path}: its config resolves differently today than when it started ({'; '.join(differ[:3])}"
            f"{'; ...' if len(differ) > 3 else ''}): kd or a config file changed since; resume it with the "
            f"version that started it, or start a new run"
        )


def _write_hydra_files(path: Path, cfg: DictConfig) -> None:
    """What Hydra writes to .hydra/ (told not to, since it would write before the run is claimed)."""
    hydra = cast(DictConfig, HydraConfig.instance().cfg)  # the whole config, its `hydra` node within (not a HydraConf)
    files = {"config.yaml": cfg, "hydra.yaml": hydra, "overrides.yaml": hydra.hydra.overrides.task}
    for name, node in files.items():
        atomic_write(path / ".hydra" / name, partial(OmegaConf.save, node))  # OmegaConf.save(node, tmp)
