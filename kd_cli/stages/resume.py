"""`resume=RUN_DIR` (or a sweep folder): continue an unfinished run, or sweep, in its own directory.

Handled before Hydra starts because the run directory and the overrides are Hydra's inputs: the
saved overrides are taken, a new value given for one of them replaces it in place, and
`hydra.run.dir` (or `hydra.sweep.dir`) points back at the run. Whether the resume may change a value
is decided when the run is claimed (stages/claim.py), after its lock is taken and before anything is
written. A directory that already holds a run is never reused by accident: without `resume=` kd
refuses to write into it (here early, and again, for certain, once the lock is held).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from kd_cli.engine.lock import holder
from kd_cli.engine.rundir import COMPLETE, holds_kd_record, holds_run, read_summary
from kd_cli.errors import KdError
from kd_cli.overrides import split_override
from kd_cli.stages import STAGES

RUN_DIR_KEY = "hydra.run.dir"
SWEEP_DIR_KEY = "hydra.sweep.dir"
SWEEP_RECORD = "multirun.yaml"
# Overrides that say where and how to continue, not what the run is: never carried over.
NOT_CARRIED = ("resume", "resume_extend", RUN_DIR_KEY, SWEEP_DIR_KEY)


def value_of(args: list[str], key: str) -> str | None:
    """The last value given for `key` (`key=v`, `+key=v` or `++key=v`), or None."""
    values = [split_override(a)[1] for a in args if "=" in a and split_override(a)[0] == key]
    return values[-1] if values else None


def resume_arguments(stage: str, args: list[str]) -> list[str]:
    target = value_of(args, "resume")
    if target in (None, "", "null", "None"):
        return _rank_arguments(args)
    path = Path(target).expanduser()
    if (path / SWEEP_RECORD).is_file():
        return _sweep_arguments(stage, path, args)
    saved = path / ".hydra" / "overrides.yaml"
    if not saved.exists():
        raise KdError(f"resume={target}: no kd run there (missing {saved}); give the run directory to continue")
    _check_resumable(path, target, stage)
    merged = merge(_read_list(saved), [a for a in args if split_override(a)[0] not in ("resume", RUN_DIR_KEY)])
    return _rank_arguments([*merged, f"resume={path}", f"{RUN_DIR_KEY}={path}"])


def merge(saved: list[str], fresh: list[str]) -> list[str]:
    """The saved overrides with each new value in place of the saved one of its key; new keys after."""
    kept = [o for o in saved if split_override(o)[0] not in NOT_CARRIED]
    position = {split_override(o)[0]: i for i, o in enumerate(kept)}
    extra = []
    for override in fresh:
        key = split_override(override)[0]
        if key in position:
            kept[position[key]] = override
        else:
            extra.append(override)
    return [*kept, *extra]


def _check_resumable(path: Path, target: str, stage: str) -> None:
    summary = read_summary(path)
    if summary.get("status") == COMPLETE:
        raise KdError(f"resume={target}: that run is already complete; start a new run instead")
    saved_stage = (yaml.safe_load(_read_text(path / ".hydra" / "config.yaml")) or {}).get("stage")
    if saved_stage != stage:
        raise KdError(f"resume={target} is a {saved_stage} run; continue it with `kd {saved_stage} resume={target}`")
    owner = holder(path)
    if owner is not None:
        raise KdError(
            f"resume={target}: that run is still being written ({owner.describe()}); wait for it to "
            f"finish, or stop it first"
        )


def _sweep_arguments(stage: str, sweep: Path, args: list[str]) -> list[str]:
    """A sweep continued: the same sweep again into its folder; finished jobs are kept as they are,
    stopped ones continue, the others run (each job is checked when it is claimed)."""
    record = yaml.safe_load(_read_text(sweep / SWEEP_RECORD)) or {}
    hydra = record.get("hydra") or {}
    saved_stage = record.get("stage")
    if saved_stage != stage:
        raise KdError(f"resume={sweep} is a sweep of {saved_stage}; continue it with `kd {saved_stage} resume={sweep}`")
    overrides = hydra.get("overrides") or {}
    # Hydra's own settings too (hydra.sweep.subdir, hydra/launcher=...): the jobs land in the folders they
    # started in, through the launcher they started with.
    saved_hydra = [
        str(o) for o in overrides.get("hydra") or [] if split_override(str(o))[0] not in (SWEEP_DIR_KEY, "hydra.mode")
    ]
    saved = [*saved_hydra, *(str(o) for o in overrides.get("task") or [])]
    fresh = [a for a in args if split_override(a)[0] not in ("resume", SWEEP_DIR_KEY) and a not in ("-m", "--multirun")]
    return ["-m", *merge(saved, fresh), f"resume={sweep}", f"{SWEEP_DIR_KEY}={sweep}"]


def guard_run_dir(stage: str, args: list[str]) -> None:
    """Refuse `hydra.run.dir=DIR` when DIR holds a run and this is not `resume=DIR` (early: the run's
    claim checks it again once the directory is locked); refuse an empty folder setting before Hydra
    makes directories from it (an empty paths.outputs would put runs at the root of the file system)."""
    for key in ("paths.outputs", "paths.data", RUN_DIR_KEY, SWEEP_DIR_KEY):
        value = value_of(args, key)
        if value is not None and not value.strip().strip("'\""):
            raise KdError(f"{key} is empty; give a folder, e.g. {key}=outputs")
    target = value_of(args, RUN_DIR_KEY)
    if target is None or value_of(args, "resume") not in (None, "null"):
        return
    run = Path(target)
    owner = holder(run)
    if owner is not None:
        raise KdError(
            f"{run} is being written by another kd process ({owner.describe()}); wait for it to finish, "
            f"or choose another directory"
        )
    if holds_run(run):
        if not holds_kd_record(run):
            raise KdError(
                f"{run} holds a run's files kd did not write (a summary.json, a model); choose another directory"
            )
        hint = f"continue it with resume={run}, or " if STAGES[stage].resumes else ""
        raise KdError(f"{run} already holds a run; {hint}choose another directory")


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise KdError(f"cannot read {path} ({getattr(error, 'strerror', None) or error})") from None


def _read_list(path: Path) -> list[str]:
    try:
        saved = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as error:
        raise KdError(f"{path} is broken ({str(error).splitlines()[0]}); the run cannot be continued safely") from None
    if saved is not None and not isinstance(saved, list):
        raise KdError(f"{path} is not a list of overrides; the run cannot be continued safely")
    return [str(o) for o in saved or []]


def _rank_arguments(args: list[str]) -> list[str]:
    """Under torchrun only rank 0 writes the run directory; the other ranks log to a scratch one."""
    if int(os.environ.get("RANK", "0")) == 0:
        return args
    scratch = tempfile.mkdtemp(prefix=f"kd-rank{os.environ['RANK']}-")
    return [*args, f"{RUN_DIR_KEY}={scratch}", "hydra.output_subdir=null"]
