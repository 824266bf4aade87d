"""Taking a run directory before a stage writes anything into it.

One writer: the directory's lock is taken first (a second process is refused in one line naming the
first). Never over another run: a directory that holds a run is written again only by `resume=` that
names it (or the sweep it belongs to). A resume does not change what the run is: its overrides are
compared with the saved ones, and any change is refused by name, except those that do not change the
numbers (FREE_ON_RESUME) and, with `resume_extend=true`, those that train the same run longer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kd_cli.engine.lock import DirectoryLock
from kd_cli.engine.resume_state import LAST, load_resume_state
from kd_cli.engine.rundir import (
    COMPLETE,
    CONFIG,
    METRICS,
    SWEEP_RECORD,
    enclosing,
    holds_kd_record,
    holds_run,
    holds_sweep,
    read_summary,
)
from kd_cli.errors import KdError
from kd_cli.overrides import canonical, flatten, override_map

# Keys that say how to run, not what: never part of the comparison.
HOW_TO_RUN = ("resume", "resume_extend")
# Changing these on resume leaves the run the same experiment (where it runs, how it reports).
FREE_ON_RESUME = (
    "trainer.progress",
    "trainer.device",
    "trainer.num_workers",
    "trainer.eval_batch_size",
    "paths.data",
    "dataset.root",
    "dataset.download",
    "logger",
    "teacher_cache",
)
# These train the same run further; allowed with resume_extend=true.
EXTEND_ON_RESUME = ("trainer.epochs", "trainer.eval_every")


@dataclass
class Claim:
    lock: DirectoryLock
    previous: dict[str, Any] = field(default_factory=dict)  # summary.json before this process
    resuming: bool = False
    changes: list[str] = field(default_factory=list)  # accepted changes of a resume, as overrides
    finished: bool = False  # a complete job of a resumed sweep: nothing to do


def claim_run_dir(
    path: Path, resume: str | None, extend: bool, overrides: list[str], in_sweep: bool, resumable: bool = True
) -> Claim:
    """Lock `path` and decide whether this process may write it (else a one-line KdError).
    `resumable`: the stage can continue a run (`resume=`), which the messages then suggest."""
    then = f", or stop it and continue with resume={path}" if resumable else ""
    lock = DirectoryLock.acquire(path, f"wait for it to finish{then}")
    try:
        return _claim(path, lock, resume, extend, overrides, in_sweep, resumable)
    except BaseException:
        lock.release()
        raise


def _claim(
    path: Path,
    lock: DirectoryLock,
    resume: str | None,
    extend: bool,
    overrides: list[str],
    in_sweep: bool,
    resumable: bool,
) -> Claim:
    _check_place(path, in_sweep)
    if _refused_before_start(path):
        return Claim(lock)
    if not holds_run(path):
        _check_holds_no_runs(path)
        return Claim(lock)
    target = Path(resume).expanduser().resolve() if resume else None
    whole_sweep = in_sweep and target == path.resolve().parent
    if target != path.resolve() and not whole_sweep:
        if not holds_kd_record(path):
            raise KdError(
                f"{path} holds a run's files kd did not write (a summary.json, a model); choose another directory"
            )
        hint = f"continue it with resume={path}, or " if resumable else ""
        raise KdError(f"{path} already holds a run; {hint}choose another directory")
    changes = resume_changes(path, overrides, extend, given_as=resume or str(path))
    previous = read_summary(path)
    if previous.get("status") == COMPLETE:
        if whole_sweep:
            return Claim(lock, previous, finished=True)
        raise KdError(f"resume={resume}: that run is already complete; start a new run instead")
    if (path / LAST).exists():
        load_resume_state(path / LAST)  # a corrupt checkpoint is refused before the run is touched
    return Claim(lock, previous, resuming=True, changes=changes)


def _check_holds_no_runs(path: Path) -> None:
    """A new run never goes into a folder that holds other runs below it (the outputs folder itself, a
    sweep's parent): its files would mix with theirs, and kd report would see one run where there are many."""
    inner = _a_run_below(path)
    if inner is not None:
        raise KdError(f"{path} holds other runs ({inner}); a run needs a folder of its own: choose a new one")


def _a_run_below(path: Path, depth: int = 4, budget: int = 20_000) -> Path | None:
    """A run or sweep folder under `path` (up to `depth` levels: outputs/stage/date/time), if any; at most
    `budget` entries are looked at, so a huge data folder costs a bounded scan."""
    level = [path]
    for _ in range(depth):
        below = []
        for folder in level:
            try:
                entries = [entry for entry in os.scandir(folder) if entry.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for entry in entries:
                budget -= 1
                if budget < 0:
                    return None
                found = Path(entry.path)
                if holds_run(found) or holds_sweep(found):
                    return found
                below.append(found)
        level = below
    return None


def _refused_before_start(path: Path) -> bool:
    """A sweep's job that was refused before it started holds only the summary saying so: not a run."""
    return read_summary(path).get("started_run") is False and not (path / CONFIG).exists()


def _check_place(path: Path, in_sweep: bool) -> None:
    """A run never goes inside another run's folder, nor into a sweep's folder unless it is its job."""
    outer = enclosing(path, holds_run)
    if outer is not None:
        raise KdError(f"{path} is inside the run directory {outer}; choose a directory outside any run")
    if holds_sweep(path):
        raise KdError(f"{path} holds a sweep ({SWEEP_RECORD}); choose another directory")
    sweep = enclosing(path, holds_sweep)
    if sweep is not None and not (in_sweep and sweep == path.resolve().parent):
        raise KdError(f"{path} is inside the sweep folder {sweep}; choose a directory outside it")


def resume_changes(path: Path, overrides: list[str], extend: bool, given_as: str) -> list[str]:
    """The overrides that differ from the run's own, if each is allowed; else a KdError naming them."""
    saved = override_map(read_saved(path / ".hydra" / "overrides.yaml") or [], ignore=HOW_TO_RUN)
    now = override_map(overrides, ignore=HOW_TO_RUN)
    ran_with = _settings(path)
    changes = []
    for key in dict.fromkeys([*saved, *now]):
        before = saved.get(key, ran_with.get(key))
        after = now.get(key, ran_with.get(key))
        if canonical(before) != canonical(after):
            changes.append((key, before, after))
    refused = [
        c for c in changes if not _among(c[0], FREE_ON_RESUME) and not (extend and _among(c[0], EXTEND_ON_RESUME))
    ]
    if refused:
        listed = ", ".join(f"{key}={after} (the run has {before})" for key, before, after in refused)
        hint = (
            "; to train it longer, add resume_extend=true"
            if all(_among(k, EXTEND_ON_RESUME) for k, _, _ in refused)
            else "; a resumed run keeps its own settings: drop these overrides, or start a new run"
        )
        raise KdError(f"resume={given_as} would change what the run is: {listed}{hint}")
    if extend:
        _check_epochs(path, now.get("trainer.epochs"))
    return [f"{key}={after}" for key, _before, after in changes]


def _among(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _settings(path: Path) -> dict[str, Any]:
    """What the run ran with: every config value (dotted keys) and every config group's choice."""
    config = flatten(read_saved(path / CONFIG) or {})
    hydra = read_saved(path / ".hydra" / "hydra.yaml") or {}
    choices = (((hydra.get("hydra") or {}).get("runtime") or {}).get("choices")) or {}
    return {**config, **choices}


def _check_epochs(path: Path, epochs: str | None) -> None:
    if epochs is None:
        return
    try:
        done = max(0, len((path / METRICS).read_text().splitlines()) - 1)
    except OSError:
        return
    if float(epochs) < done:
        raise KdError(f"trainer.epochs={epochs} but {path} has already trained {done} epochs; give at least {done}")


def read_saved(path: Path) -> Any:
    """A saved YAML file of the run; None when absent; a one-line error naming it when broken."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KdError(f"{path} is unreadable or broken ({reason}); the run cannot be continued safely") from None
